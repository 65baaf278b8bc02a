"""Named routes: DoRALinear's DoRA computed another way where that is measurably faster.

dora_minimal.core is DoRA: the layer's LoRA output y0 under autograd, then DoRAFunction. A
linear layer in a plain eager call may instead take one of these routes, which compute the same
numbers (tests/test_routes.py holds each equal to the core to ~1e-12 in float64, both
detach_norm modes) in a shape of computation that suits its size (tutorial chapter 8 measures
each gain with `python -m dora_minimal.bench --route NAME`):

    core           dora_minimal.core, as everywhere else.
    merged_weight  a small step (a toy model's layer): form W' = c ⊙ V' (out, in) and make one
                   product x W'^T, as the textbook does; backward through ∂L/∂W' = G^T x. Few
                   operations and Python calls, which is what a small step's time goes to.
                   Also an eval call without gradients when tokens >= in: W' once, one product.
    blocked        a large step: y0 inside one Function (the big product adds onto the low-rank
                   one inside the matmul), and backward a block of tokens at a time into
                   preallocated buffers, so that no (tokens, out) temporary is alive beside y0,
                   y and ∂L/∂x.

Precision: the core and `blocked` compute y0 = x W0^T + s·(x A^T) B^T, which has LoRA's
precision; where s·B A nearly cancels a row of W0 (‖V'_j‖ = ε ‖W0_j‖) the two products cancel
in the output too, and the error grows like 1/ε. `merged_weight` forms V' first, as the textbook
does, and has its precision. Measured (`python .ci/precision.py`: a 64 -> 16 float32 layer,
lora_A[0] = -(1-ε)·W0[0]/s, lora_B[0, 0] = 1, against a float64 textbook; torch 2.13.0, 2-core
x86_64 CPU, 2026-12-07), the core's and `blocked`'s error as a multiple of the float32
textbook's, for the output, ∂L/∂x and ∂L/∂m: ε = 1e-2: 46×, 54×, 23×; ε = 1e-4: 5.3e3×, 4.9e3×,
1.7e3×; ε = 1e-6: 6.1e5×, 4.2e5×, 2.8e5× (PEFT 0.22.0's DoRA about the same: 5.1e3×, 5.7e3×,
2.8e3× at 1e-4). An eval call without gradients takes `merged_weight` from `in` tokens and the
core below, so near such a row a token's output depends on its batch: up to 3.6e-6, 3.6e-4 and
3.6e-2 of its size at these ε (batches of 1 to 80 tokens on the 64-wide layer). The core alone
is not batch-independent there either (the matmul's summation order changes with the batch, and
the cancellation magnifies it); `merged_weight` in every eval call would be (1.8e-7 at every ε),
but costs more than the core at few tokens, where the core needs only r-wide products for the
norm, so the rule stays.

choose_route() picks a route per call; force_route(name) makes every plain eager call of a
linear layer take `name` (the tests and the benchmark use it). Any other call takes the core.
"""

import contextlib

import torch
from torch.nn import functional as F

from .core import (adapted_row_norm, adapted_rows, divide_or_zero, dora_scale_unchecked,
                   linear_lora_output, norm_backward, row_blocks)

ROUTES = ("core", "merged_weight", "blocked")
SMALL_STEP = 2**26  # merged_weight serves training steps of at most this many multiply-adds
_forced = None

# The package's only private PyTorch names, here together, each with a public fallback (torch
# 2.13 has no public form of either): whether a torch.func transform is running (without it,
# plain_eager() says no and every call takes the core), and autograd's C++ apply (without it,
# Function.apply).
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_cpp_apply = getattr(torch._C, "_FunctionBase", None)


def plain_eager(grad=None):
    """True for a plain eager call, where a route may run: not traced by torch.compile or export,
    no torch.func transform running, and `grad` (in backward) a tensor with storage (a gradient
    batched by autograd.grad(is_grads_batched=True) has none, and out= cannot write batches)."""
    if torch.compiler.is_compiling() or _transforms_active is None or _transforms_active():
        return False
    if grad is not None:
        try:
            grad.untyped_storage()
        except RuntimeError:  # "Cannot access storage of BatchedTensorImpl"
            return False
    return True


def route_apply(function, *args):
    """function.apply(*args) through autograd's C++ apply: Function.apply's Python first looks for
    torch.func transforms and unwraps their tensors (a route runs only where plain_eager() said
    there are none), which costs about as much as a toy step's arithmetic (chapter 8)."""
    if _cpp_apply is None:
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


@contextlib.contextmanager
def force_route(name):
    """Within the block, every plain eager DoRA call of a linear layer takes route `name`
    (None: as choose_route decides)."""
    global _forced
    if name is not None and name not in ROUTES:
        raise ValueError(f"name: expected one of {ROUTES}, got {name!r}")
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


def choose_route(x, lora_input, weight, needs_grad):
    """The route of one DoRA call of a linear layer: x (..., in), weight (out, in), lora_input
    the adapter branch's input if not x (dropout), needs_grad whether autograd may record it
    (grad mode)."""
    if not plain_eager():
        return "core"
    # W' = c ⊙ V' in bf16/fp16 would round c, and dropout feeds the adapter another x
    mergeable = lora_input is None and weight.dtype in (torch.float32, torch.float64)
    if _forced is not None:
        return _forced if _forced != "merged_weight" or mergeable else "core"
    out_features, in_features = weight.shape
    tokens_in = x.numel()  # tokens·in
    if not needs_grad:  # eval: W' once pays when there are at least as many tokens as in
        return "merged_weight" if mergeable and tokens_in >= in_features**2 else "core"
    small = (mergeable and tokens_in * out_features <= SMALL_STEP  # tokens·in·out
             # W' (out·in numbers) no larger than x and y together (tokens·(in + out))
             and out_features * in_features**2 <= tokens_in * (in_features + out_features))
    return "merged_weight" if small else "blocked"


def dora_linear_route(route, x, lora_input, weight, lora_A, lora_B, magnitude, bias, scaling,
                      detach_norm):
    """y of a linear layer's DoRA by `route` (arguments checked by the caller)."""
    if route == "merged_weight" and not torch.is_grad_enabled():
        return F.linear(x, merged_weight(weight, lora_A, lora_B, magnitude, scaling), bias)
    if route == "merged_weight":
        return route_apply(MergedWeight, x, weight, lora_A, lora_B, magnitude, bias, scaling,
                           detach_norm)
    if route == "blocked":
        return route_apply(Blocked, x, lora_input, weight, lora_A, lora_B, magnitude, bias,
                           scaling, detach_norm)
    y0 = linear_lora_output(x, weight, lora_A, lora_B, scaling, lora_input)
    return dora_scale_unchecked(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm)


def new_linear(x, W, bias):
    """F.linear(x, W, bias) (..., out) as a tensor of its own: F.linear of a 1-d or 3-d x is
    a view, and autograd refuses in-place changes (nn.ReLU(inplace=True)) of a view that a
    Function returns."""
    if x.dim() == 2:
        return F.linear(x, W, bias)
    y = x.new_empty(*x.shape[:-1], W.shape[0])
    y2, x2 = y.view(-1, W.shape[0]), x.reshape(-1, x.shape[-1])  # (T, out), (T, in)
    torch.mm(x2, W.T, out=y2) if bias is None else torch.addmm(bias, x2, W.T, out=y2)
    return y


def merged_weight(weight, lora_A, lora_B, magnitude, scaling):
    """W' = (m / ‖V'‖_c) ⊙ V' (out, in) in W0's dtype, a block of rows at a time in the
    accumulation dtype, each entry rounded once. Without gradients (the eval route)."""
    blocks = []
    for rows in row_blocks(*weight.shape):
        V = adapted_rows(weight, lora_A, lora_B, scaling, rows)  # (rows, in)
        norm = torch.linalg.vector_norm(V, dim=1, keepdim=True)  # (rows, 1)
        # Eq. 5: W' = m · V'/‖V'‖_c
        blocks.append((V * divide_or_zero(magnitude[rows, None].to(V.dtype), norm))
                      .to(weight.dtype))
    return torch.cat(blocks)


def core_gradients(ctx, grad_y, inputs, needs):
    """For a backward that is itself differentiated (create_graph=True) or batched: the
    gradients of `inputs` (x, x_a, W0, A, B, m, bias) where `needs` says so, by the core, forward
    once more under autograd, so that they are differentiable and batchable as the core's are."""
    x, x_a, weight, lora_A, lora_B, magnitude, bias = inputs
    with torch.enable_grad():
        y = dora_linear_route("core", x, x_a, weight, lora_A, lora_B, magnitude, bias,
                              ctx.scaling, ctx.detach_norm)
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, allow_unused=True,
                                create_graph=torch.is_grad_enabled())
    found = dict(zip(wanted, grads))
    return tuple(found.get(i) for i in range(len(inputs)))


class MergedWeight(torch.autograd.Function):
    """y = x W'^T + b with W' = c ⊙ V' formed (out, in), and its backward through ∂L/∂W' = G^T x:

        ∂L/∂x = G W'                               ∂L/∂W' = G^T x (out, in)
        Eq. 7   ∂L/∂m = rowsum(∂L/∂W' ⊙ V') / n
        Eq. 11  ∂L/∂V' = c ⊙ ∂L/∂W';   Eq. 6 adds ∂L/∂n ⊙ V̂, ∂L/∂n = -c ⊙ rowsum(∂L/∂W' ⊙ V') / n
                ∂L/∂A = s·B^T ∂L/∂V',  ∂L/∂B = s·∂L/∂V' A^T

    The older form of autograd.Function (forward takes ctx): forward saves V', W' and c without
    returning them, and apply() binds no signature, which costs more than the arithmetic here.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm):
        V = torch.addmm(weight, lora_B, lora_A, alpha=scaling)  # (out, in): Eq. 5
        norm = torch.linalg.vector_norm(V, dim=1)  # (out,): n = ‖V'‖_c
        norm.masked_fill_(norm.logical_not(), torch.inf)  # zero-row rule: x / ∞ = 0, once
        m = magnitude if magnitude.dtype == V.dtype else magnitude.to(V.dtype)
        c = (m / norm)[:, None]  # (out, 1): c = m / n, a column
        W = V * c  # (out, in): W' = c ⊙ V'
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, bias, V, W, c, norm)
        ctx.scaling, ctx.detach_norm = scaling, detach_norm
        return F.linear(x, W, bias) if x.dim() == 2 else new_linear(x, W, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, magnitude, bias, V, W, c, norm = ctx.saved_tensors
        s, needs = ctx.scaling, ctx.needs_input_grad
        if torch.is_grad_enabled() or not plain_eager(grad_y):
            grads = core_gradients(ctx, grad_y, (x, None, weight, lora_A, lora_B, magnitude, bias),
                                   needs[:1] + (False,) + needs[1:6])
            return grads[:1] + grads[2:] + (None, None)  # (MergedWeight has no x_a)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (T, in)
        G = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
        grad_x = grad_y @ W if needs[0] else None  # (..., in): ∂L/∂x = G W'
        grad_A = grad_B = grad_m = grad_bias = None
        if needs[2] or needs[3] or needs[4]:
            grad_W = G.T @ x2  # (out, in): ∂L/∂W'
            sum_G_y0 = torch.linalg.vecdot(grad_W, V)  # (out,): ∂L/∂W' · V' = Σ G ⊙ y0
            if needs[4]:  # Eq. 7
                grad_m = sum_G_y0 / norm
                grad_m = grad_m if grad_m.dtype == magnitude.dtype else grad_m.to(magnitude.dtype)
            grad_V = grad_W.mul_(c)  # Eq. 11: ∂L/∂V' = c ⊙ ∂L/∂W'
            if not ctx.detach_norm:  # Eq. 6: + ∂L/∂n ⊙ V̂ (V̂ and ∂L/∂n are 0 on a zero row)
                grad_norm = -c[:, 0] * sum_G_y0 / norm  # (out,)
                grad_V.addcmul_(V / norm[:, None], grad_norm[:, None])
            if needs[2]:  # ∂L/∂A = s·B^T ∂L/∂V' (r, in); (beta=0: lora_A gives the shape only)
                grad_A = torch.addmm(lora_A, lora_B.T, grad_V, beta=0, alpha=s)
            if needs[3]:  # ∂L/∂B = s·∂L/∂V' A^T (out, r)
                grad_B = torch.addmm(lora_B, grad_V, lora_A.T, beta=0, alpha=s)
        if needs[5]:
            grad_bias = G.sum(0)
        return grad_x, None, grad_A, grad_B, grad_m, grad_bias, None, None


class Blocked(torch.autograd.Function):
    """The core's equations with y0 = x W0^T + s·(x_a A^T) B^T formed inside, and backward a
    block of tokens at a time: for each block, Gc = G ⊙ c into one (t, out) buffer, then
    ∂L/∂x = Gc W0 + s·(Gc B) A into its rows of ∂L/∂x; then G ⊙ y0 into the same buffer, summed
    for Eq. 7. Over all tokens: ∂L/∂A = s·(Gc B)^T x_a and ∂L/∂B = s·c ⊙ G^T (x_a A^T)."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, lora_A, lora_B, magnitude, bias, scaling,
                detach_norm):
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)  # (T, in)
        xa2 = x2 if x_adapter is None else x_adapter.reshape(-1, in_features)  # (T, in)
        norm = adapted_row_norm(weight, lora_A, lora_B, scaling)  # (out,)
        c = divide_or_zero(magnitude.to(norm.dtype), norm)  # (out,)
        xA = xa2 @ lora_A.T  # (T, r)
        y0 = (xA @ lora_B.T).addmm_(x2, weight.T, beta=scaling)  # (T, out): s·xA B^T + x W0^T
        y = y0.new_empty(*x.shape[:-1], out_features)  # (..., out): not a view (new_linear)
        # y = c ⊙ y0 + b, computed in float32 and rounded once
        y2 = y.view(-1, out_features)  # (T, out)
        torch.mul(y0, c, out=y2) if bias is None else torch.addcmul(bias, y0, c, out=y2)
        keep_y0 = magnitude.requires_grad or not detach_norm  # only Eq. 7 and 6 read it
        ctx.save_for_backward(x, x_adapter, weight, lora_A, lora_B, magnitude, bias, c, norm,
                              xA, y0 if keep_y0 else None)
        ctx.scaling, ctx.detach_norm = scaling, detach_norm
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_a, weight, lora_A, lora_B, magnitude, bias, c, norm, xA, y0 = ctx.saved_tensors
        s, needs = ctx.scaling, ctx.needs_input_grad
        if torch.is_grad_enabled() or not plain_eager(grad_y):
            inputs = (x, x_a, weight, lora_A, lora_B, magnitude, bias)
            return core_gradients(ctx, grad_y, inputs, needs[:7]) + (None, None)
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)  # (T, in)
        xa2 = x2 if x_a is None else x_a.reshape(-1, in_features)  # (T, in)
        G = grad_y.reshape(-1, out_features)  # (T, out)
        exact = not ctx.detach_norm and (needs[3] or needs[4])
        tokens = G.shape[0]
        size = block_tokens(tokens, in_features, out_features)
        starts = range(0, tokens, size)
        # Σ_t G ⊙ y0 (out,), in float32: one row per block, summed at the end
        block_sums = c.new_empty(len(starts), out_features) if needs[5] or exact else None
        GcB = G.new_empty(tokens, lora_B.shape[1]) if needs[0] or needs[1] or needs[3] else None
        grad_x = torch.empty_like(x2) if needs[0] else None  # (T, in)
        buffer = G.new_empty(min(size, tokens), out_features)  # (t, out)
        for i, start in enumerate(starts):
            rows = slice(start, start + size)
            G_rows = G[rows]  # (t, out)
            Gc = torch.mul(G_rows, c, out=buffer[:len(G_rows)])  # Eq. 11: Gc = c ⊙ G
            if GcB is not None:
                torch.mm(Gc, lora_B, out=GcB[rows])  # (t, r)
            if grad_x is not None:  # ∂L/∂x = s·(Gc B) A + Gc W0, or Gc W0 if x_a has its own
                if x_a is None:
                    torch.mm(GcB[rows], lora_A, out=grad_x[rows])
                    grad_x[rows].addmm_(Gc, weight, beta=s)
                else:
                    torch.mm(Gc, weight, out=grad_x[rows])
            if block_sums is not None:  # the buffer takes G ⊙ y0 after Gc's last use
                if G.dtype == torch.float16:  # (fp16's products overflow at 65504)
                    product = G_rows.float().mul_(y0[rows])
                else:
                    product = torch.mul(G_rows, y0[rows], out=buffer[:len(G_rows)])
                torch.sum(product, 0, dtype=block_sums.dtype, out=block_sums[i])
        grad_xa = s * (GcB @ lora_A) if needs[1] else None  # (T, in)
        grad_A = s * (GcB.T @ xa2) if needs[3] else None  # (r, in): s·(Gc B)^T x_a
        # ∂L/∂B = s·Gc^T (x_a A^T) = s·c ⊙ G^T (x_a A^T) (out, r), one product with G itself
        grad_B = torch.mm(G.T, xA).mul_((s * c)[:, None]) if needs[4] else None
        grad_m = None
        if block_sums is not None:
            sum_G_y0 = block_sums.sum(0)  # (out,)
            if needs[5]:  # Eq. 7
                grad_m = divide_or_zero(sum_G_y0, norm).to(magnitude.dtype)
            if exact:  # Eq. 6's norm path
                path_A, path_B = norm_backward(divide_or_zero(-c * sum_G_y0, norm), weight,
                                               lora_A, lora_B, s, norm)
                grad_A = path_A.to(lora_A.dtype) + (0 if grad_A is None else grad_A)
                grad_B = path_B.to(lora_B.dtype) + (0 if grad_B is None else grad_B)
        grad_bias = G.sum(0) if needs[6] else None
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        if grad_xa is not None:
            grad_xa = grad_xa.reshape(x.shape)
        return grad_x, grad_xa, None, grad_A, grad_B, grad_m, grad_bias, None, None


def block_tokens(tokens, in_features, out_features):
    """Tokens per block of Blocked's backward: a quarter of them, and no more than makes the
    (t, out) buffer half the size of ∂L/∂x (T, in) when out > 2·in; a multiple of 256, at least
    512. Small blocks keep the buffer small and in cache; big ones keep the products efficient."""
    size = min(tokens // 4, tokens * in_features // (2 * out_features))
    return max(512, size - size % 256)
