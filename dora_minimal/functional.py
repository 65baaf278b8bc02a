"""DoRA in PyTorch: a torch.autograd.Function whose backward is written by hand.

The same equations as dora_minimal.reference (read that first), computed the way a GPU likes:

    V' = W0 + s·B A                      formed a block of rows at a time, only for its row norm
    ‖V'‖_c                                (out,), in float32 (float64 for float64 inputs)
    c = m / ‖V'‖_c                        (out,), in the same dtype
    y0 = x W0^T + s·(x A^T) B^T          (T, out)
    y = c ⊙ y0 + b

Backward, with G = ∂L/∂y (T, out) and Gc = G ⊙ c:
    Eq. 7   ∂L/∂m = Σ_t G ⊙ y0 / ‖V'‖_c
    Eq. 11  ∂L/∂x = Gc W0 + s·(Gc B) A,  ∂L/∂A = s·(Gc B)^T x,
            ∂L/∂B = s·Gc^T (x A^T) = s·c ⊙ G^T (x A^T)
    Eq. 6   exact mode adds the norm's path: with ∂L/∂‖V'‖_c = -c ⊙ Σ_t(G ⊙ y0) / ‖V'‖_c and
            the unit rows V̂ = V'/‖V'‖_c, ∂L/∂V'_j += (∂L/∂‖V'_j‖) V̂_j, so
            ∂L/∂B += s·(∂L/∂‖V'‖) ⊙ (V̂ A^T) and ∂L/∂A += s·((∂L/∂‖V'‖) ⊙ B)^T V̂.

Why form the rows of V' instead of expanding ‖w + s·b A‖² = ‖w‖² + 2s b·(A w) + s²‖b A‖²
(no (out, in) temporary at all)? Where s·b A nearly cancels w, the expansion subtracts large
numbers to get a small one: its relative error grows like ‖w‖²/‖v'‖², while rounding the formed
row errs like ‖w‖/‖v'‖ at most, as the textbook formula does. Blocks of rows keep the temporary
bounded (NORM_BLOCK_ELEMENTS), and nothing is kept: ‖W0‖_c is not cached, so no optimizer step,
`.data` write or load can leave a stale value behind.

The Function has two ways to run backward. Plain eager calls (the usual training step) take the
tokens in blocks, writing into preallocated buffers, so that no (T, out) temporary is alive beside
y0, y and ∂L/∂x. Under torch.compile, torch.func transforms or create_graph=True it computes the
same equations on whole tensors with out-of-place ops, which those tools can trace, batch and
differentiate again; for the last two it first recomputes ‖V'‖_c and y0 from the inputs, so that
second derivatives see how they depend on A, B and m.

A small step (a toy model's layer, see forms_merged_weight) in a plain eager call goes through a
second hand-written Function, DoRASmallStep: it forms W' = c ⊙ V' itself and makes one product
x W'^T, as the textbook does, with its backward through ∂L/∂W' = G^T x.
"""

import math

import torch
from torch.nn import functional as F

from .checks import check_bool, check_dora_arguments, check_positive

# The largest block of V' rows formed at once, in elements: 16 MiB in float32.
NORM_BLOCK_ELEMENTS = 2**22


def accumulation_dtype(dtype):
    """Norms, the scale c and ∂L/∂m are computed in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _zero_as_infinity(norm):
    """norm with ∞ where it is 0. Dividing by it gives 0 for a zero row (the zero-row rule), and
    nan where the numerator is itself inf or nan, which so stays visible."""
    return norm.masked_fill(norm.logical_not(), math.inf)


def _divide_or_zero(numerator, denominator):
    """numerator / denominator, and 0 where the denominator is 0 (the zero-row rule) unless the
    numerator is inf or nan."""
    return numerator / _zero_as_infinity(denominator)


def plain_eager(tensor=None):
    """True for an ordinary eager call: no torch.compile or export tracing, no torch.func
    transform (nor a batched `tensor`, as autograd.grad(is_grads_batched=True) passes), no graph
    being recorded. Only then may the Function write into buffers (out=, in place), which those
    tools cannot trace, batch or differentiate."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or (tensor is not None and _batched(tensor)))


def _batched(tensor):
    return (torch._C._functorch.is_batchedtensor(tensor)
            or torch._C._functorch.is_legacy_batchedtensor(tensor))


def scale_outputs(y0, c, bias=None):
    """y = c ⊙ y0 + b (..., out) in y0's dtype, the product taken in c's float32 (or float64)
    and rounded once."""
    if not plain_eager():  # out-of-place; torch.compile fuses it into one pass
        y = y0 * c if bias is None else torch.addcmul(bias, y0, c)
        return y.to(y0.dtype)
    y = torch.empty_like(y0)
    return torch.mul(y0, c, out=y) if bias is None else torch.addcmul(bias, y0, c, out=y)


def _row_blocks(out_features, in_features):
    """Slices of at most NORM_BLOCK_ELEMENTS // in rows covering 0..out."""
    rows = max(1, NORM_BLOCK_ELEMENTS // in_features)
    return [slice(start, start + rows) for start in range(0, out_features, rows)]


def adapted_rows(weight, lora_A, lora_B, scaling, rows=slice(None)):
    """V'[rows] = W0[rows] + s·B[rows] A (rows, in), a new tensor in the accumulation dtype."""
    acc = accumulation_dtype(weight.dtype)
    if weight.dtype == acc:  # Eq. 5: V' = W0 + s·B A
        return torch.addmm(weight[rows], lora_B[rows], lora_A, alpha=scaling)
    B, A = lora_B[rows].to(acc), lora_A.to(acc)
    if plain_eager():  # one temporary: the copy of W0's rows takes the product in place
        return weight[rows].to(acc).addmm_(B, A, alpha=scaling)
    return torch.addmm(weight[rows].to(acc), B, A, alpha=scaling)


def adapted_row_norm(weight, lora_A, lora_B, scaling):
    """‖V'‖_c = ‖W0 + s·B A‖_c (out,) in the accumulation dtype, forming V' a block of rows at a
    time. weight is the (out, in) view of any layer's weight (a convolution's flattened)."""
    return torch.cat([torch.linalg.vector_norm(adapted_rows(weight, lora_A, lora_B, scaling, rows),
                                               dim=1)
                      for rows in _row_blocks(*weight.shape)])


def merged_weight(weight, lora_A, lora_B, magnitude, scaling):
    """W' = (m / ‖V'‖_c) ⊙ V' (out, in) in W0's dtype: a block of rows at a time in the
    accumulation dtype, each entry rounded once. For inference without gradients."""
    blocks = []
    for rows in _row_blocks(*weight.shape):
        V = adapted_rows(weight, lora_A, lora_B, scaling, rows)  # (rows, in)
        norm = torch.linalg.vector_norm(V, dim=1, keepdim=True)  # (rows, 1)
        # Eq. 5: W' = m · V'/‖V'‖_c
        blocks.append((V * _divide_or_zero(magnitude[rows, None].to(V.dtype), norm))
                      .to(weight.dtype))
    return torch.cat(blocks)


def magnitude_and_norm_grads(sum_G_y0, magnitude, norm, c, detach_norm):
    """From g = Σ_t G ⊙ y0 (out,): ∂L/∂m (Eq. 7) and ∂L/∂‖V'‖_c (None when the norm is detached).

    y = (m/‖V'‖) ⊙ y0 + b, so ∂L/∂m = g/‖V'‖ and ∂L/∂‖V'‖ = -m g/‖V'‖² = -c g/‖V'‖, the latter
    divided once by ‖V'‖ (not by ‖V'‖² at once, which underflows for tiny rows)."""
    grad_m = _divide_or_zero(sum_G_y0, norm)  # Eq. 7
    grad_m = grad_m if grad_m.dtype == magnitude.dtype else grad_m.to(magnitude.dtype)
    grad_norm = None if detach_norm else _divide_or_zero(-c * sum_G_y0, norm)
    return grad_m, grad_norm


def norm_backward(grad_norm, weight, lora_A, lora_B, scaling, norm):
    """The norm's path of Eq. 6 to A and B: ∂L/∂V'_j = (∂L/∂‖V'_j‖) V̂_j with V̂ = V'/‖V'‖_c,
    so ∂L/∂B = s·(∂L/∂‖V'‖) ⊙ (V̂ A^T) (out, r) and ∂L/∂A = s·((∂L/∂‖V'‖) ⊙ B)^T V̂ (r, in),
    in the accumulation dtype, forming V' a block of rows at a time. Zero rows give nothing (their
    ∂L/∂‖V'‖ is 0)."""
    acc = grad_norm.dtype
    A, B = lora_A.to(acc), lora_B.to(acc)
    grad_A, grad_B = 0, []
    for rows in _row_blocks(*weight.shape):
        V = adapted_rows(weight, lora_A, lora_B, scaling, rows)  # (rows, in)
        norm_rows = _zero_as_infinity(norm[rows, None])  # (rows, 1)
        unit = V.div_(norm_rows) if plain_eager() else V / norm_rows  # V̂, 0 for a zero row
        weighted = scaling * grad_norm[rows, None]  # (rows, 1)
        grad_B.append(weighted * (unit @ A.T))  # (rows, r)
        grad_A = grad_A + (weighted * B[rows]).T @ unit  # (r, in)
    return grad_A, torch.cat(grad_B)


def low_rank_then_base(x2, xA, weight, lora_B, scaling):
    """y0 = x W0^T + s·(x A^T) B^T (T, out). The big product adds onto the low-rank one inside the
    matmul (its beta = s), so the addition costs no pass over y0 of its own."""
    y0 = xA @ lora_B.T  # (T, out)
    if plain_eager():
        return y0.addmm_(x2, weight.T, beta=scaling)
    return torch.addmm(y0, x2, weight.T, beta=scaling)


# A step of at most this many multiply-adds (tokens·in·out) takes the small-step route.
SMALL_STEP = 2**26


def forms_merged_weight(x, x_adapter, weight):
    """Whether a plain eager call goes through DoRASmallStep, which forms V' and W' = c ⊙ V'
    (out, in) and makes one product with x, rather than DoRAFunction's factored route.

    In a small step (tokens·in·out ≤ SMALL_STEP: a toy model's layer) time goes to the number of
    operations and Python calls, not to arithmetic: forming W' (as the textbook formula does)
    takes fewer of them than the factored route, and its backward's extra product G^T x (out, in)
    is then cheap. Only while W' (out·in numbers) is no larger than x and y together (tokens·
    (in + out)), so that a big layer on a few tokens keeps no (out, in) matrices for backward;
    only for float32/float64 (in bf16 the scale c stays float32 on the output), and without
    dropout (x_a = x). torch.compile and torch.func always take DoRAFunction (one path for all
    shapes); apply_dora_function asks this only for plain eager calls."""
    out_features, in_features = weight.shape
    tokens_in = x.numel()  # tokens·in
    return (x_adapter is None and weight.dtype in (torch.float32, torch.float64)
            and tokens_in * out_features <= SMALL_STEP
            # out·in ≤ tokens·(in + out), both sides times in
            and out_features * in_features**2 <= tokens_in * (in_features + out_features))


class DoRAFunction(torch.autograd.Function):
    """y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·(x_a A^T) B^T) + b with a hand-written backward.

    x_a is the adapter branch's input (dropout(x) in training, else x itself). W0 is frozen.
    apply() returns (y, c, ‖V'‖_c, x_a A^T, y0); all but y are kept for backward and carry no
    gradient. torch.func (grad, jacrev, vmap) and torch.compile can use it as it is.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_adapter, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm):
        in_features, out_features = weight.shape[1], weight.shape[0]
        x2 = x if x.dim() == 2 else x.reshape(-1, in_features)  # (T, in)
        xa2 = x2 if x_adapter is None else x_adapter.reshape(-1, in_features)  # (T, in)
        # first the norm, so that its blocks of V' are freed before y0 and y exist
        norm = adapted_row_norm(weight, lora_A, lora_B, scaling)  # (out,)
        # c = m / ‖V'‖_c, kept in float32 so that a small change of m survives in bf16
        c = _divide_or_zero(magnitude.to(norm.dtype), norm)  # (out,)
        xA = xa2 @ lora_A.T  # (T, r)
        y0 = low_rank_then_base(x2, xA, weight, lora_B, scaling)  # (T, out)
        y = scale_outputs(y0, c, bias)  # y = c ⊙ y0 + b
        y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)  # (no view of y)
        return y, c, norm, xA, y0

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_adapter, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm = inputs
        _, c, norm, xA, y0 = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero (T, out) gradients for y0 and the others
        # y0 (T, out) is kept only for Eq. 7 and the exact mode's norm path
        keep_y0 = ctx.needs_input_grad[5] or not detach_norm
        ctx.save_for_backward(x, x_adapter, weight, lora_A, lora_B, magnitude, c, norm, xA,
                              y0 if keep_y0 else None)
        ctx.scaling, ctx.detach_norm = scaling, detach_norm

    @staticmethod
    def backward(ctx, grad_y, *_):
        x, x_adapter, weight, lora_A, lora_B, magnitude, c, norm, xA, y0 = ctx.saved_tensors
        if grad_y is None:  # y took no part in the loss
            return (None,) * 9
        s, detach_norm, needs = ctx.scaling, ctx.detach_norm, ctx.needs_input_grad
        in_features, out_features = weight.shape[1], weight.shape[0]
        x2 = x if x.dim() == 2 else x.reshape(-1, in_features)  # (T, in)
        xa2 = None if x_adapter is None else x_adapter.reshape(-1, in_features)
        G = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, out_features)  # (T, out)
        eager = plain_eager(grad_y)
        if eager:
            grads = _backward_in_blocks(G, x2, xa2, weight, lora_A, lora_B, magnitude, c, norm,
                                        xA, y0, s, detach_norm, needs)
        else:
            if not torch.compiler.is_compiling():  # create_graph=True, torch.func, compiled
                # autograd: recompute the saved values from the inputs (so that second
                # derivatives see them change)
                norm, c, xA, y0 = _factored_values(x2, xa2, weight, lora_A, lora_B, magnitude, s,
                                                   detach_norm)
            grads = _backward_whole(G, x2, xa2, weight, lora_A, lora_B, magnitude, c, norm, xA,
                                    y0, s, detach_norm, needs)
        return _input_grads(x, *grads)


def _factored_values(x2, xa2, weight, lora_A, lora_B, magnitude, s, detach_norm):
    """‖V'‖_c, c, x_a A^T and y0 from the inputs, with ops that autograd can record: what
    DoRAFunction's forward saves, recomputed for a backward that is itself differentiated."""
    norm = adapted_row_norm(weight, lora_A, lora_B, s)
    norm = norm.detach() if detach_norm else norm
    c = _divide_or_zero(magnitude.to(norm.dtype), norm)
    xA = (x2 if xa2 is None else xa2) @ lora_A.T
    y0 = torch.addmm(xA @ lora_B.T, x2, weight.T, beta=s)
    return norm, c, xA, y0


def _input_grads(x, grad_x, grad_xa, grad_A, grad_B, grad_m, grad_bias):
    """The gradients of (x, x_a, W0, A, B, m, bias, scaling, detach_norm), ∂L/∂x in x's shape."""
    if grad_x is not None and x.dim() != 2:
        grad_x = grad_x.reshape(x.shape)
    if grad_xa is not None:
        grad_xa = grad_xa.reshape(x.shape)
    return grad_x, grad_xa, None, grad_A, grad_B, grad_m, grad_bias, None, None


class DoRASmallStep(torch.autograd.Function):
    """The same y as DoRAFunction, for a small step in a plain eager call (forms_merged_weight):
    it forms V' and W' = c ⊙ V' (out, in), as the textbook does, and makes one product x W'^T.

    Backward goes through ∂L/∂W' = G^T x (out, in):
        Eq. 7   ∂L/∂m = rowsum(∂L/∂W' ⊙ V') / ‖V'‖_c
        Eq. 11  ∂L/∂V' = c ⊙ ∂L/∂W', ∂L/∂A = s·B^T ∂L/∂V', ∂L/∂B = s·∂L/∂V' A^T
        Eq. 6   exact mode adds (∂L/∂‖V'‖_c) ⊙ V̂ to ∂L/∂V', ∂L/∂‖V'‖_c = -c ⊙ rowsum(∂L/∂W' ⊙ V')
                / ‖V'‖_c
        ∂L/∂x = G W'
    It is written in the older form of autograd.Function (forward takes ctx), which torch.func
    cannot transform but which lets forward save V', W', c and ‖V'‖_c without returning them;
    returned as extra outputs, as DoRAFunction's form requires, they cost about 10 µs a step on
    a 2-core CPU, more than some of the arithmetic. A backward that is itself differentiated or
    batched (create_graph=True, is_grads_batched, compiled autograd) takes DoRAFunction's
    equations, recomputed from the inputs.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm):
        V = torch.addmm(weight, lora_B, lora_A, alpha=scaling)  # (out, in): Eq. 5
        norm = torch.linalg.vector_norm(V, dim=1)  # (out,): ‖V'‖_c
        norm.masked_fill_(norm.logical_not(), math.inf)  # dividing by ∞: the zero-row rule
        m = magnitude if magnitude.dtype == V.dtype else magnitude.to(V.dtype)
        c = (m / norm)[:, None]  # (out, 1): c = m/‖V'‖_c, a column
        W = V * c  # (out, in): Eq. 5, W' = m · V'/‖V'‖_c
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, V, W, c, norm)
        ctx.scaling, ctx.detach_norm = scaling, detach_norm
        return F.linear(x, W, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, magnitude, V, W, c, norm = ctx.saved_tensors
        s, needs = ctx.scaling, ctx.needs_input_grad
        out_features, in_features = W.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, in_features)  # (T, in)
        G = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, out_features)  # (T, out)
        if not plain_eager(grad_y):  # a backward that is itself differentiated or batched
            norm, c, xA, y0 = _factored_values(x2, None, weight, lora_A, lora_B, magnitude, s,
                                               ctx.detach_norm)
            grad_x, _, grad_A, grad_B, grad_m, grad_bias = _backward_whole(
                G, x2, None, weight, lora_A, lora_B, magnitude, c, norm, xA, y0, s,
                ctx.detach_norm, (needs[0], False) + needs[1:])  # (no x_a: as DoRAFunction's)
            grad_x = None if grad_x is None else grad_x.reshape(x.shape)
            return grad_x, None, grad_A, grad_B, grad_m, grad_bias, None, None
        grad_x = grad_y @ W if needs[0] else None  # (..., in)
        grad_A = grad_B = grad_m = grad_bias = None
        if needs[2] or needs[3] or needs[4]:
            grad_W = G.T @ x2  # (out, in): ∂L/∂W'
            sum_G_y0 = torch.linalg.vecdot(grad_W, V)  # (out,): Σ_t G ⊙ y0, as y0 = x V'^T
            if needs[4]:
                grad_m = sum_G_y0 / norm  # Eq. 7
                grad_m = grad_m if grad_m.dtype == magnitude.dtype else grad_m.to(magnitude.dtype)
            grad_V = grad_W.mul_(c)  # (out, in): ∂L/∂V' = c ⊙ ∂L/∂W', Eq. 11
            if not ctx.detach_norm:  # Eq. 6: ∂L/∂V'_j += (∂L/∂‖V'_j‖) V'_j/‖V'_j‖
                grad_norm = -c[:, 0] * sum_G_y0 / norm  # (out,)
                grad_V.addcmul_(V / norm[:, None], grad_norm[:, None])  # V̂ is 0 on zero rows
            # ∂L/∂A = s·B^T ∂L/∂V' (r, in) and ∂L/∂B = s·∂L/∂V' A^T (out, r), the s taken
            # inside the product (beta=0: the first argument only gives the shape)
            if needs[2]:
                grad_A = torch.addmm(lora_A, lora_B.T, grad_V, beta=0, alpha=s)
            if needs[3]:
                grad_B = torch.addmm(lora_B, grad_V, lora_A.T, beta=0, alpha=s)
        if needs[5]:
            grad_bias = G.sum(0)
        return grad_x, None, grad_A, grad_B, grad_m, grad_bias, None, None


def _backward_whole(G, x2, xa2, weight, lora_A, lora_B, magnitude, c, norm, xA, y0, s,
                    detach_norm, needs):
    """Eq. 6, 7 and 11 on whole tensors with out-of-place ops (for compile, torch.func and
    double backward). Returns ∂L/∂(x, x_a, A, B, m, bias), None where not needed."""
    dtype = G.dtype
    grad_x = grad_xa = grad_A = grad_B = grad_m = grad_bias = None
    Gc = (G * c).to(dtype)  # (T, out): Eq. 11, Gc = G ⊙ c
    GcB = Gc @ lora_B  # (T, r)
    if needs[0]:  # ∂L/∂x = Gc W0 + s·(Gc B) A, the adapter's part to x_a if it had its own input
        grad_x = Gc @ weight if xa2 is not None else torch.addmm(GcB @ lora_A, Gc, weight, beta=s)
    if needs[1]:
        grad_xa = s * (GcB @ lora_A)  # (T, in)
    if needs[3]:
        grad_A = s * (GcB.T @ (x2 if xa2 is None else xa2))  # (r, in): s·(Gc B)^T x
    if needs[4]:
        grad_B = ((G.T @ xA) * (s * c)[:, None]).to(dtype)  # (out, r): s·c ⊙ G^T (x A^T)
    if needs[5] or not detach_norm and (needs[3] or needs[4]):
        sum_G_y0 = (G * y0).sum(0, dtype=c.dtype)  # (out,)
        grad_A, grad_B, grad_m = magnitude_and_norm_path(
            sum_G_y0, grad_A, grad_B, weight, lora_A, lora_B, magnitude, c, norm, s, detach_norm,
            *needs[3:6])
    if needs[6]:
        grad_bias = G.sum(0)
    return grad_x, grad_xa, grad_A, grad_B, grad_m, grad_bias


def magnitude_and_norm_path(sum_G_y0, grad_A, grad_B, weight, lora_A, lora_B, magnitude, c,
                            norm, s, detach_norm, needs_A, needs_B, needs_m):
    """From Σ G ⊙ y0 (out,): ∂L/∂m (Eq. 7), and in exact mode the norm's path (Eq. 6) added to
    ∂L/∂A and ∂L/∂B (or as them, where they are None) in lora_A's and lora_B's dtype. Returns
    (∂L/∂A, ∂L/∂B, ∂L/∂m), None for what is not needed."""
    grad_m, grad_norm = magnitude_and_norm_grads(sum_G_y0, magnitude, norm, c, detach_norm)
    if grad_norm is not None and (needs_A or needs_B):
        norm_grad_A, norm_grad_B = norm_backward(grad_norm, weight, lora_A, lora_B, s, norm)
        if needs_A:
            grad_A = _plus(grad_A, norm_grad_A, lora_A.dtype)
        if needs_B:
            grad_B = _plus(grad_B, norm_grad_B, lora_B.dtype)
    return grad_A, grad_B, grad_m if needs_m else None


def _plus(grad, path, dtype):
    """grad + path in grad's dtype, or path alone in `dtype` where grad is None."""
    return path.to(dtype) if grad is None else grad + path.to(grad.dtype)


def _backward_in_blocks(G, x2, xa2, weight, lora_A, lora_B, magnitude, c, norm, xA, y0, s,
                        detach_norm, needs):
    """The same as _backward_whole, a block of tokens at a time into preallocated buffers: one
    (t, out) buffer takes G ⊙ c and then G ⊙ y0, so that no (T, out) temporary is alive beside
    y0, y and ∂L/∂x."""
    grad_xa = grad_A = grad_B = grad_m = grad_bias = None
    exact = not detach_norm and (needs[3] or needs[4])
    tokens, out_features = G.shape
    size = _block_tokens(tokens, weight.shape[1], out_features)
    starts = range(0, tokens, size)
    # Σ_t G ⊙ y0 (out,) is summed a block at a time, in float32, one row per block
    block_sums = c.new_empty(len(starts), out_features) if needs[5] or exact else None
    GcB = G.new_empty(tokens, lora_B.shape[1]) if needs[0] or needs[1] or needs[3] else None
    grad_x = torch.empty_like(x2) if needs[0] else None  # (T, in)
    buffer = G.new_empty(min(size, tokens), out_features)  # (t, out)
    for i, start in enumerate(starts):
        rows = slice(start, start + size)
        G_rows = G[rows]  # (t, out)
        Gc = torch.mul(G_rows, c, out=buffer[:len(G_rows)])  # Eq. 11: Gc = G ⊙ c
        if GcB is not None:
            torch.mm(Gc, lora_B, out=GcB[rows])
        if grad_x is not None:  # ∂L/∂x = s·(Gc B) A + Gc W0, the big product adding on
            if xa2 is None:
                torch.mm(GcB[rows], lora_A, out=grad_x[rows])
                grad_x[rows].addmm_(Gc, weight, beta=s)
            else:  # the adapter branch saw dropout(x): its part goes to ∂L/∂x_a below
                torch.mm(Gc, weight, out=grad_x[rows])
        if block_sums is not None:  # the buffer now takes G ⊙ y0, after Gc's last use
            product = torch.mul(G_rows, y0[rows], out=buffer[:len(G_rows)])
            torch.sum(product, 0, dtype=block_sums.dtype, out=block_sums[i])
    if needs[1]:
        grad_xa = s * (GcB @ lora_A)  # (T, in)
    if needs[3]:
        grad_A = s * (GcB.T @ (x2 if xa2 is None else xa2))  # (r, in): s·(Gc B)^T x
    if needs[4]:
        # s·Gc^T (x A^T) = s·c ⊙ G^T (x A^T) (out, r), from G in one product
        grad_B = torch.mm(G.T, xA).mul_((s * c)[:, None])
    if block_sums is not None:
        grad_A, grad_B, grad_m = magnitude_and_norm_path(
            block_sums.sum(0), grad_A, grad_B, weight, lora_A, lora_B, magnitude, c, norm, s,
            detach_norm, *needs[3:6])
    if needs[6]:
        grad_bias = G.sum(0)
    return grad_x, grad_xa, grad_A, grad_B, grad_m, grad_bias


def apply_dora_function(x, x_adapter, weight, lora_A, lora_B, magnitude, bias, scaling,
                        detach_norm):
    """y from DoRAFunction, or from DoRASmallStep for a small step in an eager call
    (forms_merged_weight), through autograd's C++ apply (apply_function)."""
    if eager_call() and forms_merged_weight(x, x_adapter, weight):
        return super(torch.autograd.Function, DoRASmallStep).apply(
            x, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm)
    return apply_function(DoRAFunction, x, x_adapter, weight, lora_A, lora_B, magnitude, bias,
                          scaling, detach_norm)[0]


def eager_call():
    """True outside torch.compile/export tracing and torch.func transforms: there a Function may
    enter autograd's C++ apply directly. (plain_eager says more: whether buffers may be written.)"""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def apply_function(function, *args):
    """function.apply(*args), entering autograd's C++ side directly in eager calls: Function.apply
    first binds the arguments to forward's signature with inspect, which torch.compile and
    torch.func need, and which costs about 90 µs a call on a 2-core CPU."""
    if eager_call():
        return super(torch.autograd.Function, function).apply(*args)
    return function.apply(*args)


def _block_tokens(tokens, in_features, out_features):
    """Tokens per block of backward: a quarter of them, and no more than makes the (t, out) buffer
    half the size of ∂L/∂x (T, in) when out > 2·in; a multiple of 256, at least 512. Small blocks
    keep the buffer small and in cache; big ones keep the products with W0 efficient."""
    size = min(tokens // 4, tokens * in_features // (2 * out_features))
    return max(512, size - size % 256)


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_functional_arguments(x, weight, lora_A, lora_B, magnitude, bias, scaling, use_dora=True):
    """Validate the arguments of dora_linear / lora_linear (types, shapes, dtypes, devices)."""
    names = ("x", "weight", "lora_A", "lora_B", "magnitude")
    check_dora_arguments(x, weight, lora_A, lora_B, magnitude, bias,
                         array_type=torch.Tensor, names=names, needs_m=use_dora)
    _check_same_device(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude,
                       bias=bias)
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name}: expected dtype {weight.dtype} (weight's), got {t.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: expected a frozen weight (requires_grad=False); DoRA trains "
                         "lora_A, lora_B and magnitude, and computes no gradient for weight "
                         "(with torch.func, differentiate only those three and pass the frozen "
                         "weight and bias to functional_call separately)")
    if torch.compiler.is_compiling():  # a symbolic float there; eager calls check it
        return scaling
    return check_positive("scaling", scaling)


def autocast_dtype(x):
    """The dtype torch.autocast computes linear layers in on x's device, or None when it is off
    (or x is float64, which autocast leaves alone, as it does for nn.Linear)."""
    if (autocast_may_be_on(x) and isinstance(x, torch.Tensor) and x.dtype != torch.float64
            and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        return torch.get_autocast_dtype(x.device.type)
    return None


def autocast_may_be_on(x):
    """A quick no for the usual call, before autocast_dtype looks at x's device (which costs a
    few µs a layer): torch's one check covers CPU, CUDA and most devices, but not MPS and MAIA
    (torch 2.13)."""
    return (torch._C._is_any_autocast_enabled()
            or getattr(x, "is_mps", False) or getattr(x, "is_maia", False))


def _caster(dtype):
    """t -> t in `dtype` (differentiably), for floating tensors; anything else is left as it is."""
    return lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, detach_norm=True,
                *, lora_input=None):
    """DoRA's linear map y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·(x A^T) B^T) + b.

    x (..., in), weight (out, in) frozen, lora_A (r, in), lora_B (out, r), magnitude (out,),
    scaling = lora_alpha / r, bias (out,) or None. Returns (..., out) in x's dtype.
    Gradients reach x, lora_A, lora_B, magnitude (and bias if it requires grad).
    detach_norm=True treats ‖V'‖_c as a constant in backward (Eq. 11, as PEFT); False gives the
    exact gradient (Eq. 6). lora_input: the adapter branch's input if not x (dropout(x)).
    """
    dtype = autocast_dtype(x)
    if dtype is not None:  # run in autocast's dtype, as nn.Linear would; m and c stay float32
        cast = _caster(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(cast(x), cast(weight), cast(lora_A), cast(lora_B), magnitude,
                               scaling, cast(bias), detach_norm, lora_input=cast(lora_input))
    s = check_functional_arguments(x, weight, lora_A, lora_B, magnitude, bias, scaling)
    detach_norm = check_bool("detach_norm", detach_norm)
    if lora_input is not None and lora_input.shape != x.shape:
        raise ValueError(f"lora_input: expected x's shape {tuple(x.shape)}, "
                         f"got {tuple(lora_input.shape)}")
    return apply_dora_function(x, lora_input, weight, lora_A, lora_B, magnitude, bias, s,
                               detach_norm)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, *, lora_input=None):
    """Plain LoRA (Eq. 1): y = x W0^T + s·(x A^T) B^T + b, by ordinary autograd."""
    dtype = autocast_dtype(x)
    if dtype is not None:  # run in autocast's dtype, as nn.Linear would
        cast = _caster(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(cast(x), cast(weight), cast(lora_A), cast(lora_B), scaling,
                               cast(bias), lora_input=cast(lora_input))
    s = check_functional_arguments(x, weight, lora_A, lora_B, None, bias, scaling, use_dora=False)
    return lora_forward(x, weight, lora_A, lora_B, s, bias, lora_input)


def lora_forward(x, weight, lora_A, lora_B, scaling, bias=None, lora_input=None):
    """lora_linear without the argument checks (for callers that made them)."""
    lead, in_features = x.shape[:-1], weight.shape[1]
    x2 = x.reshape(-1, in_features)  # (T, in)
    xa2 = x2 if lora_input is None else lora_input.reshape(-1, in_features)  # (T, in)
    # s·(x A^T) B^T is added onto the base output in place: one (T, out) tensor, not two
    y = F.linear(x2, weight, bias)
    if torch._C._functorch.peek_interpreter_stack() is not None:  # torch.func: out of place
        return torch.addmm(y, xa2 @ lora_A.T, lora_B.T, alpha=scaling).reshape(*lead, -1)
    y.addmm_(xa2 @ lora_A.T, lora_B.T, alpha=scaling)
    return y if x.dim() == 2 else y.reshape(*lead, weight.shape[0])

