"""DoRA's scale for any layer: y = (m / ‖V'‖_c) ⊙ y0 + b, with a hand-written backward.

A layer's own op (a convolution, an embedding lookup, a linear map) computes the LoRA output
y0 = base(x; W0) + s·B(A(x)) under ordinary autograd. What makes it DoRA is only this step:

    V' = W0 + s·B A                  on the layer's (out, in') view of its weights
    c = m / ‖V'‖_c                   (out,), in float32 (float64 for float64 weights)
    y = c ⊙ y0 + b                   c and b broadcast along the channel dimension of y0

Backward, with G = ∂L/∂y and sums over every dimension but the channel's:
    ∂L/∂y0 = G ⊙ c                   y0's own graph takes it on to x, A and B (Eq. 11)
    Eq. 7    ∂L/∂m = Σ G ⊙ y0 / ‖V'‖_c,   ∂L/∂b = Σ G
    Eq. 6    exact mode (detach_norm=False) adds the norm's path to the (out, in') views of A
             and B: ∂L/∂‖V'‖_c = -c ⊙ Σ(G ⊙ y0) / ‖V'‖_c, brought to A and B by norm_backward.

The (out, in') views: a linear layer's W0 itself; a convolution's W0 flattened to
(out, in·k) with A (r, in·k) and B (out, r) flattened the same way; an embedding's W0^T
(embedding_dim, num_embeddings) with B A; transformers' Conv1D's W0^T.
"""

import torch

from .checks import check_dora_arguments
from .functional import (_divide_or_zero, adapted_row_norm, apply_function, autocast_dtype,
                         magnitude_and_norm_path, plain_eager, scale_outputs)


def _along_channel(vector, trailing_dims):
    """(out,) -> (out, 1, ..., 1) with `trailing_dims` ones: broadcasts along y0's channel dim."""
    return None if vector is None else vector.reshape((-1,) + (1,) * trailing_dims)


def _sum_but_channel(t, trailing_dims, dtype):
    """Σ of t over every dimension but the channel's (out,), in `dtype`."""
    channel = t.ndim - 1 - trailing_dims
    dims = [d for d in range(t.ndim) if d != channel]
    return t.sum(dims, dtype=dtype) if dims else t.to(dtype)  # sum(dim=[]) would sum all


class DoRAScale(torch.autograd.Function):
    """y = (m / ‖W0 + s·B A‖_c) ⊙ y0 + b for y0 (..., out, *trailing) of any layer.

    weight, lora_A, lora_B: the layer's (out, in'), (r, in') and (out, r) views (weight frozen);
    magnitude (out,); bias (out,) or None; trailing_dims: how many dims of y0 follow its channel
    dim (a convolution's spatial dims; 0 for a linear or embedding output).
    apply() returns (y, c, ‖V'‖_c); c and ‖V'‖_c carry no gradient.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm,
                trailing_dims):
        norm = adapted_row_norm(weight, lora_A, lora_B, scaling)  # (out,)
        # c = m / ‖V'‖_c, kept in float32 so that a small change of m survives in bf16
        c = _divide_or_zero(magnitude.to(norm.dtype), norm)  # (out,)
        y = scale_outputs(y0, _along_channel(c, trailing_dims),
                          _along_channel(bias, trailing_dims))  # y = c ⊙ y0 + b
        return y, c, norm

    @staticmethod
    def setup_context(ctx, inputs, output):
        y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm, trailing_dims = inputs
        _, c, norm = output
        ctx.mark_non_differentiable(c, norm)
        ctx.set_materialize_grads(False)
        exact = not detach_norm and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        # y0 is kept only for Eq. 7 and the exact mode's norm path
        ctx.save_for_backward(y0 if ctx.needs_input_grad[4] or exact else None, weight, lora_A,
                              lora_B, magnitude, c, norm)
        ctx.scaling, ctx.detach_norm, ctx.trailing_dims = scaling, detach_norm, trailing_dims
        ctx.exact = exact

    @staticmethod
    def backward(ctx, grad_y, *_):
        y0, weight, lora_A, lora_B, magnitude, c, norm = ctx.saved_tensors
        if grad_y is None:  # y took no part in the loss
            return (None,) * 9
        s, trailing, needs = ctx.scaling, ctx.trailing_dims, ctx.needs_input_grad
        eager = plain_eager(grad_y)
        if not eager and not torch.compiler.is_compiling():
            # create_graph=True or torch.func: recompute ‖V'‖_c and c from the inputs, so that
            # second derivatives see how they depend on A, B and m
            norm = adapted_row_norm(weight, lora_A, lora_B, s)
            norm = norm.detach() if ctx.detach_norm else norm
            c = _divide_or_zero(magnitude.to(norm.dtype), norm)
        grad_y0 = grad_m = grad_A = grad_B = grad_bias = product = None
        if needs[4] or ctx.exact:
            product = grad_y * y0  # G ⊙ y0
            sum_G_y0 = _sum_but_channel(product, trailing, c.dtype)  # (out,)
            # Eq. 7, and in exact mode Eq. 6's norm path to the (out, in') views of A and B
            grad_A, grad_B, grad_m = magnitude_and_norm_path(
                sum_G_y0, None, None, weight, lora_A, lora_B, magnitude, c, norm, s,
                ctx.detach_norm, needs[2], needs[3], needs[4])
        if needs[0]:  # ∂L/∂y0 = G ⊙ c
            c_channel = _along_channel(c, trailing)
            if eager and product is not None:  # G ⊙ y0's buffer takes it: no new one
                grad_y0 = torch.mul(grad_y, c_channel, out=product)
            else:
                grad_y0 = (grad_y * c_channel).to(grad_y.dtype)
        if needs[5]:
            grad_bias = _sum_but_channel(grad_y, trailing, c.dtype).to(grad_y.dtype)
        return grad_y0, None, grad_A, grad_B, grad_m, grad_bias, None, None, None


def dora_scale(y0, weight, lora_A, lora_B, magnitude, scaling, bias=None, detach_norm=True,
               trailing_dims=0):
    """y = (m / ‖W0 + s·B A‖_c) ⊙ y0 + b (same shape and dtype as y0), by DoRAScale.

    y0 (..., out, *trailing): the layer's LoRA output without bias; weight (out, in') frozen,
    lora_A (r, in'), lora_B (out, r): the layer's views; magnitude (out,); bias (out,) or None;
    trailing_dims: the number of dims of y0 after its channel dim. Under torch.autocast the scale
    is computed with autocast off: the norms and c in float32, from the weights as they are.
    """
    check_dora_arguments(None, weight, lora_A, lora_B, magnitude, bias, array_type=torch.Tensor,
                         names=("y0", "weight", "lora_A", "lora_B", "magnitude"), needs_x=False)
    channel = y0.ndim - 1 - trailing_dims
    if channel < 0 or y0.shape[channel] != weight.shape[0]:
        raise ValueError(f"y0: expected {weight.shape[0]} channels (weight's out) in dim "
                         f"{channel} (then {trailing_dims} trailing dims), got shape "
                         f"{tuple(y0.shape)}")
    args = (y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm, trailing_dims)
    if autocast_dtype(y0) is not None:
        with torch.autocast(y0.device.type, enabled=False):
            return apply_function(DoRAScale, *args)[0]
    return apply_function(DoRAScale, *args)[0]
