"""Exercises 11-13: the PyTorch core's forward and its hand-written backward. Fill in each function.

Chapter 6 reads dora_minimal/core.py, one torch.autograd.Function for every layer kind. Here you
write its three parts yourself; the DoRAFunction at the end of this file (already written, as in
core.py) assembles them, and the tests run it as they run the core's. Solve them in order; after
exercise N, run the tests that exercises 11 to N make runnable with

    python -m pytest tests/test_torch_exercises.py --impl=exercises --exercise N

Every layer kind computes LoRA's output y0 = base(x; W0) + s·B(A(x)) with its own op, under
autograd (a linear layer: y0 = x W0^T + s·(x A^T) B^T). Your functions take y0 and the (out, in')
views of the weights: y0 (..., out, *trailing), trailing_dims of them after the channel dim (a
convolution's spatial dims; 0 for a linear layer), weight W0 (out, in'), lora_A (r, in'),
lora_B (out, r), magnitude m (out,), bias b (out,) or None, scaling s, grad_y = ∂L/∂y, shaped
as y0. With n = ‖V'‖_c, V' = W0 + s·B A:

    y = c ⊙ y0 + b,  c = m / n  (0 for a zero row of V': the zero-row rule)

The helpers of dora_minimal.core are yours to use, imported below: adapted_row_norm (n, in float32
or float64), divide_or_zero (the zero-row rule), along_channel ((out,) -> broadcastable against
y0) and sum_but_channel (Σ over every dim but the channel's). Stuck? tutorial/exercises/HINTS.md
has one hint per exercise, kept apart so you can choose not to read it.
"""

import torch

from dora_minimal.core import (adapted_row_norm, along_channel, divide_or_zero,  # noqa: F401
                               sum_but_channel)  # (you will need them)


def scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims):
    """Exercise 11 (Eq. 5). Return y = c ⊙ y0 + b (y0's shape and dtype), c = m / ‖V'‖_c.

    c is 0 for a zero row of V', and keeps the sign of m. Compute c and the product in the dtype
    of adapted_row_norm's result (float32 for bf16 weights), and round y once, at the end.
    """
    raise NotImplementedError("exercise 11: scale_forward")


def scale_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    """Exercise 12 (Eq. 7 and 11). Return (∂L/∂y0, ∂L/∂m, ∂L/∂b), shaped as y0, m and (out,).

    ∂L/∂y0 = c ⊙ G (Eq. 11), ∂L/∂m = Σ G ⊙ y0 / ‖V'‖_c (Eq. 7), ∂L/∂b = Σ G, with G = grad_y and
    Σ over every dim but the channel's. A zero row of V' gets ∂L/∂y0 = 0 and ∂L/∂m = 0. Take
    the products G ⊙ y0 and the sums in the dtype of adapted_row_norm's result (float32 for bf16
    or fp16). Return ∂L/∂y0 in grad_y's dtype, ∂L/∂m in magnitude's, and ∂L/∂b in grad_y's: the
    bias is no argument here, and a layer keeps it in the dtype of its output, which grad_y has.

    Trap: with dims the list of every dim but the channel's, t.sum(dims) sums over *every* dim
    when dims is empty (torch's sum over dim=[]), as it is for a 1-d y0 (out,), one token of a
    linear layer: ∂L/∂m would be one number. Keep t as it is then (sum_but_channel does).
    """
    raise NotImplementedError("exercise 12: scale_backward")


def norm_path_backward(grad_y, y0, weight, lora_A, lora_B, magnitude, scaling, trailing_dims):
    """Exercise 13 (Eq. 6). Return (∂L/∂A, ∂L/∂B) (r, in') and (out, r) along the norm's path
    only: what the exact gradient (detach_norm=False) adds to what y0's graph gives A and B.

    ∂L/∂n = -c ⊙ Σ G ⊙ y0 / n, and row j of ∂L/∂V' gains ∂L/∂n_j · V'_j / n_j; V' = W0 + s·B A
    takes it on to A and B. A zero row of V' adds nothing. (Forming V' whole is fine here.)
    Σ G ⊙ y0 is exercise 12's, with the same trap for a 1-d y0. Return ∂L/∂A in lora_A's dtype
    and ∂L/∂B in lora_B's.
    """
    raise NotImplementedError("exercise 13: norm_path_backward")


class DoRAFunction(torch.autograd.Function):
    """core.DoRAFunction, assembled from your three functions (nothing to write here).

    forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm, trailing_dims)
    returns y; backward returns one gradient per input, None where there is none.
    """

    @staticmethod
    def forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm,
                trailing_dims):
        return scale_forward(y0, weight, lora_A, lora_B, magnitude, bias, scaling, trailing_dims)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y0, weight, lora_A, lora_B, magnitude, bias, scaling, detach_norm, trailing_dims = inputs
        ctx.save_for_backward(y0, weight, lora_A, lora_B, magnitude)
        ctx.scaling, ctx.detach_norm, ctx.trailing_dims = scaling, detach_norm, trailing_dims

    @staticmethod
    def backward(ctx, grad_y):
        y0, weight, lora_A, lora_B, magnitude = ctx.saved_tensors
        needs_y0, _, needs_A, needs_B, needs_m, needs_bias = ctx.needs_input_grad[:6]
        arguments = (grad_y, y0, weight, lora_A, lora_B, magnitude, ctx.scaling, ctx.trailing_dims)
        grad_y0, grad_m, grad_bias = scale_backward(*arguments)  # both modes
        grad_A = grad_B = None  # Eq. 11 (detach_norm): the norm is a constant
        if not ctx.detach_norm and (needs_A or needs_B):  # Eq. 6: the norm's path too
            grad_A, grad_B = norm_path_backward(*arguments)
        return (grad_y0 if needs_y0 else None, None, grad_A if needs_A else None,
                grad_B if needs_B else None, grad_m if needs_m else None,
                grad_bias if needs_bias else None, None, None, None)
