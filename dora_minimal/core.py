"""DoRA in PyTorch: one torch.autograd.Function, its backward written by hand beside its forward.

Read dora_minimal.reference (tutorial chapters 1-5) first: this file computes the same equations.
Every adapted layer (a linear layer, a convolution, an embedding, transformers' Conv1D) first
computes LoRA's output with its own op, under ordinary autograd:

    y0 = base(x; W0) + s·B(A(x))        a linear layer: y0 = x W0^T + s·(x A^T) B^T

What makes it DoRA is one more step, on the (out, in') view of the layer's weights (a linear
layer's W0 itself; a convolution's W0 flattened to (out, in·k); an embedding's W0^T):

    V' = W0 + s·B A                      Eq. 5, formed a block of rows at a time, for its norm
    n = ‖V'‖_c                           (out,), in float32 (float64 for float64 weights)
    c = m / n                            (out,), 0 for a zero row (the zero-row rule)
    y = c ⊙ y0 + b                       = x W'^T + b with W' = c ⊙ V' (Eq. 5)

Backward, with G = ∂L/∂y and Σ over every dimension but the channel's:

    ∂L/∂y0 = c ⊙ G                       Eq. 11; y0's graph takes it on to x, A and B
    ∂L/∂m = Σ G ⊙ y0 / n                 Eq. 7
    ∂L/∂b = Σ G
    Eq. 6 (detach_norm=False): n depends on A and B too. With V̂ = V'/n (unit rows),
    ∂L/∂n = -c ⊙ Σ G ⊙ y0 / n, and ∂L/∂V'_j gains ∂L/∂n_j · V̂_j, so
    ∂L/∂B += s·(∂L/∂n ⊙ V̂) A^T  and  ∂L/∂A += s·(∂L/∂n ⊙ B)^T V̂.

Why ∂L/∂y0 = c ⊙ G is Eq. 11: y0 = x V'^T, so ∂L/∂V' = (c ⊙ G)^T x = c ⊙ G^T x = c ⊙ ∂L/∂W'.
And why Σ G ⊙ y0 is Eq. 7's ∂L/∂W' · V': Σ_t G_tj (x_t · V'_j) = (G^T x)_j · V'_j.

Only public PyTorch is used, every op out of place: this is the code torch.compile, torch.export,
torch.func (grad, vmap, jacrev) and double backward run. dora_minimal.routes computes the same
differently for a linear layer where that is measurably faster, and is tested equal to this.
"""

import torch
from torch.nn import functional as F

# The largest block of V' rows formed at once, in elements: 16 MiB in float32.
NORM_BLOCK_ELEMENTS = 2**22


class DoRAFunction(torch.autograd.Function):
    """y = c ⊙ y0 + b with c = m / ‖W0 + s·B A‖_c, for the LoRA output y0 of any layer.

    y0 (..., out, *trailing): the layer's LoRA output, without bias; weight (out, in') frozen,
    lora_A (r, in'), lora_B (out, r): the layer's (out, in') views; magnitude (out,); bias (out,)
    or None; scaling s; detach_norm: Eq. 11 (True, as PEFT) or the exact Eq. 6 (False);
    trailing_dims: how many dims of y0 follow its channel dim.
    """
    generate_vmap_rule = True  # torch.func.vmap batches forward and backward as they are

    @staticmethod
    def forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm,
                trailing_dims):
        norm = adapted_row_norm(weight, lora_A, lora_B, scaling)  # (out,): n = ‖V'‖_c
        c = along_channel(divide_or_zero(magnitude.to(norm.dtype), norm), trailing_dims)
        y = y0 * c if bias is None else torch.addcmul(along_channel(bias, trailing_dims), y0, c)
        return y.to(y0.dtype)  # y = c ⊙ y0 + b, in float32 and rounded once

    @staticmethod
    def setup_context(ctx, inputs, output):
        y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm, trailing_dims = inputs
        ctx.save_for_backward(y0, weight, lora_A, lora_B, magnitude)
        ctx.scaling, ctx.detach_norm, ctx.trailing_dims = scaling, detach_norm, trailing_dims

    @staticmethod
    def backward(ctx, G):
        y0, weight, lora_A, lora_B, magnitude = ctx.saved_tensors
        s, trailing = ctx.scaling, ctx.trailing_dims
        # which inputs autograd wants a gradient for (y0, weight, lora_A, lora_B, magnitude, bias)
        needs_y0, _, needs_A, needs_B, needs_m, needs_bias = ctx.needs_input_grad[:6]
        exact = not ctx.detach_norm and (needs_A or needs_B)
        # n and c as forward had them, computed again from the inputs (cheap next to y0), so
        # that a double backward sees how they depend on A, B and m
        norm = adapted_row_norm(weight, lora_A, lora_B, s)  # (out,)
        norm = norm.detach() if ctx.detach_norm else norm
        c = divide_or_zero(magnitude.to(norm.dtype), norm)  # (out,)
        grad_y0 = grad_A = grad_B = grad_m = grad_bias = None
        if needs_y0:  # Eq. 11: ∂L/∂y0 = c ⊙ G
            grad_y0 = (G * along_channel(c, trailing)).to(G.dtype)
        if needs_m or exact:
            # (out,): Σ G ⊙ y0, the products in float32 (fp16's overflow at 65504)
            sum_G_y0 = sum_but_channel(G.to(c.dtype) * y0, trailing, c.dtype)
        if needs_m:  # Eq. 7: ∂L/∂m = Σ G ⊙ y0 / n
            grad_m = divide_or_zero(sum_G_y0, norm).to(magnitude.dtype)
        if exact:  # Eq. 6: ∂L/∂n = -c ⊙ Σ G ⊙ y0 / n, then on to A and B
            grad_norm = divide_or_zero(-c * sum_G_y0, norm)  # (out,)
            grad_A, grad_B = norm_backward(grad_norm, weight, lora_A, lora_B, s, norm)
            grad_A, grad_B = grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)
        if needs_bias:  # ∂L/∂b = Σ G
            grad_bias = sum_but_channel(G, trailing, c.dtype).to(G.dtype)
        # one gradient per input of forward; None for W0 (frozen) and the three settings
        return grad_y0, None, grad_A, grad_B, grad_m, grad_bias, None, None, None


def dora_scale_unchecked(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm,
                         trailing_dims=0):
    """DoRAFunction.apply, with A and B passed detached when the norm is (Eq. 11 sends them no
    gradient through it; y0's graph gives them theirs), so that the Function never returns None
    for an input that needs a gradient (which compiled autograd does not accept)."""
    if detach_norm:
        lora_A, lora_B = lora_A.detach(), lora_B.detach()
    return DoRAFunction.apply(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm,
                              trailing_dims)


def linear_lora_output(x, weight, lora_A, lora_B, scaling, lora_input=None, bias=None):
    """A linear layer's y0 = x W0^T + s·(x_a A^T) B^T (+ b) (..., out), x_a = lora_input
    (dropout(x)) or x, under autograd: what DoRAFunction scales for DoRALinear and dora_linear
    (without b), and LoRA's output (with b)."""
    x2 = x.reshape(-1, x.shape[-1])  # (T, in)
    xa2 = x2 if lora_input is None else lora_input.reshape(-1, x.shape[-1])  # (T, in)
    # the low-rank product adds onto the base one inside addmm: no pass over (T, out) of its
    # own (and not torch.add(..., alpha=s) of two products: torch 2.13's inductor drops that s)
    y0 = torch.addmm(F.linear(x2, weight, bias), F.linear(xa2, lora_A), lora_B.T, alpha=scaling)
    return y0 if x.dim() == 2 else y0.reshape(*x.shape[:-1], weight.shape[0])


# --- the helpers: the row norm in blocks, the zero-row rule, the channel dimension ---------


def accumulation_dtype(dtype):
    """Norms, c and ∂L/∂m are float32 (float64 for float64 weights): in bf16 c = 1.001 is 1."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def divide_or_zero(numerator, denominator):
    """numerator / denominator, a zero denominator counting as ∞: 0 there (the zero-row rule),
    unless the numerator is inf or nan, which then stays visible as nan."""
    return numerator / denominator.masked_fill(denominator.logical_not(), torch.inf)  # (== 0)


def row_blocks(out_features, in_features):
    """Slices of at most NORM_BLOCK_ELEMENTS // in rows covering 0..out."""
    rows = max(1, NORM_BLOCK_ELEMENTS // in_features)
    return [slice(start, start + rows) for start in range(0, out_features, rows)]


def adapted_rows(weight, lora_A, lora_B, scaling, rows=slice(None)):
    """V'[rows] = W0[rows] + s·B[rows] A (rows, in'), in the accumulation dtype."""
    acc = accumulation_dtype(weight.dtype)
    B, A = lora_B[rows].to(acc), lora_A.to(acc)
    if weight.dtype == acc:  # Eq. 5: V' = W0 + s·B A
        return torch.addmm(weight[rows], B, A, alpha=scaling)
    # a bf16/fp16 W0: its float32 copy takes the product in place (one temporary, not two)
    return weight[rows].to(acc).addmm_(B, A, alpha=scaling)


def adapted_row_norm(weight, lora_A, lora_B, scaling):
    """n = ‖W0 + s·B A‖_c (out,) in the accumulation dtype, a block of V' rows at a time, so
    that no (out, in') matrix is ever whole. Nothing is cached: no optimizer step, `.data`
    write or load can leave a stale norm behind."""
    return torch.cat([torch.linalg.vector_norm(adapted_rows(weight, lora_A, lora_B, scaling, rows),
                                               dim=1)
                      for rows in row_blocks(*weight.shape)])


def norm_backward(grad_norm, weight, lora_A, lora_B, scaling, norm):
    """Eq. 6's norm path: ∂L/∂V'_j = ∂L/∂n_j · V̂_j brought to A (r, in') and B (out, r),
    a block of V' rows at a time, in the accumulation dtype."""
    grad_A, grad_B = 0, []
    A, B = lora_A.to(norm.dtype), lora_B.to(norm.dtype)
    for rows in row_blocks(*weight.shape):
        # (rows, in'): V̂, 0 for a zero row; in place, so that one block of V' is alive at once
        unit = adapted_rows(weight, lora_A, lora_B, scaling, rows).div_(
            norm[rows, None].masked_fill(norm[rows, None].logical_not(), torch.inf))
        weighted = scaling * grad_norm[rows, None]  # (rows, 1): s·∂L/∂n
        grad_B.append(weighted * (unit @ A.T))  # (rows, r): s·(∂L/∂n ⊙ V̂) A^T
        grad_A = grad_A + (weighted * B[rows]).T @ unit  # (r, in'): s·(∂L/∂n ⊙ B)^T V̂
    return grad_A, torch.cat(grad_B)


def along_channel(vector, trailing_dims):
    """(out,) -> (out, 1, ..., 1), to broadcast along y0's channel dim, which `trailing_dims`
    dims follow (a convolution's spatial dims; 0 for a linear layer or an embedding)."""
    return vector.reshape((-1,) + (1,) * trailing_dims)


def sum_but_channel(t, trailing_dims, dtype):
    """Σ of t over every dim but the channel's -> (out,), in `dtype`."""
    channel = t.ndim - 1 - trailing_dims
    dims = [d for d in range(t.ndim) if d != channel]
    return t.sum(dims, dtype=dtype) if dims else t.to(dtype)  # (sum over dim=[] sums all)
