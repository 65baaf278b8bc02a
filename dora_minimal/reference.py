"""DoRA from scratch in NumPy: the four steps and their gradients, written as the paper writes them.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024 (arXiv 2402.09353, v6).
Shapes follow torch.nn.Linear: a weight is (out, in) and y = x W^T + b.

    W0 (out, in)   frozen pretrained weight
    A  (r, in)     low-rank factor          B (out, r)   low-rank factor
    m  (out,)      magnitude                s            scaling = lora_alpha / r
    ‖V‖_c (out,)   the paper's "column norm": the L2 norm of each output row of V

    Eq. 2   W0 = m · V / ‖V‖_c,    m = ‖W0‖_c, V = W0         (decompose)
    Eq. 5   V' = W0 + s·B A                                   (adapt the direction)
    Eq. 5   W' = m · V' / ‖V'‖_c                              (recombine; merge)
    Eq. 6   ∂L/∂V' = (m/‖V'‖_c) (I - V'V'^T/‖V'‖_c²) ∂L/∂W'   (exact gradient, row by row)
    Eq. 7   ∂L/∂m  = (∂L/∂W' · V') / ‖V'‖_c
    Eq. 11  ∂L/∂V' = (m/‖V'‖_c) ∂L/∂W'                         (norm detached, the paper's default)

Zero rows. A row of V' that is exactly zero (a dead output unit) has no direction. We define its
direction, its scale m/‖V'‖_c and every gradient through its norm as 0, so the unit stays dead
(its output is its bias) and nothing becomes NaN or inf, unless m itself is (then that row
is NaN, as any other row would be).

Everything here is float64 by default (float32 is accepted) and materializes (out, in) matrices:
it is the readable reference. dora_minimal.functional computes the same without them.
"""

from functools import partial

import numpy as np

from .checks import check_array, check_bool, check_dora_arguments, check_positive

# the arguments are NumPy arrays (a torch tensor goes to dora_minimal.functional instead)
check_array = partial(check_array, array_type=np.ndarray)
check_dora_arguments = partial(check_dora_arguments, array_type=np.ndarray)


def _divide_or_zero(numerator, denominator):
    """numerator / denominator, a zero denominator counting as ∞: 0 where it is 0 (the zero-row
    rule), unless the numerator is inf or nan (then nan, which stays visible)."""
    return numerator / np.where(denominator == 0, np.inf, denominator)


def row_norm(W):
    """‖W‖_c: the L2 norm of each output row of W (out, in) -> (out,).

    Each row is divided by its largest entry before squaring, so that squares of very large or
    very small weights neither overflow nor underflow.
    """
    check_array("W", W, 2)
    largest = np.max(np.abs(W), axis=1)  # (out,)
    scale = np.where(largest > 0, largest, 1)[:, None]  # (out, 1); zero rows keep scale 1
    # ‖w_j‖ = max_i |w_ji| · sqrt(Σ_i (w_ji / max_i |w_ji|)²)
    return scale[:, 0] * np.sqrt(np.sum((W / scale) ** 2, axis=1))


def decompose(W):
    """Step 1 (Eq. 2): W (out, in) -> magnitude m = ‖W‖_c (out,) and direction W / ‖W‖_c (out, in).

    The direction has unit rows (zero rows stay zero), and m[:, None] * direction == W.
    """
    # Eq. 2: m = ‖W‖_c
    m = row_norm(W)  # (out,)
    # Eq. 2: direction = V / ‖V‖_c with V = W
    direction = _divide_or_zero(W, m[:, None])  # (out, in)
    return m, direction


def adapt(W0, A, B, scaling):
    """Step 2 (Eq. 5): V' = W0 + s·B A, the direction adapted by the low-rank update.

    W0 (out, in), A (r, in), B (out, r), scaling s = lora_alpha / r -> V' (out, in).
    The update is added to the unnormalized W0, then normalized in step 3.
    """
    check_dora_arguments(None, W0, A, B, None, needs_x=False, needs_m=False)
    s = check_positive("scaling", scaling)
    # Eq. 5: V' = W0 + s·B A
    return W0 + s * (B @ A)  # (out, in)


def recombine(m, V):
    """Step 3 (Eq. 5): W' = m · V / ‖V‖_c, from magnitude m (out,) and direction V (out, in).

    Rescaling a row of V by a positive factor leaves W' unchanged, and ‖W'‖_c == |m| row by row
    (for non-zero rows of V; a zero row of V gives a zero row of W').
    """
    check_array("V", V, 2)
    check_array("m", m, 1)
    if m.shape[0] != V.shape[0]:
        raise ValueError(f"m: expected shape ({V.shape[0]},) to match V {V.shape}, got {m.shape}")
    # Eq. 5: W' = m · V / ‖V‖_c
    return _divide_or_zero(m[:, None] * V, row_norm(V)[:, None])  # (out, in)


def merge(W0, A, B, m, scaling):
    """Step 4: the merged weight W' = m · (W0 + s·B A) / ‖W0 + s·B A‖_c (out, in).

    A plain linear layer with weight W' computes what the adapted layer computes.
    """
    check_dora_arguments(None, W0, A, B, m, needs_x=False)
    return recombine(m, adapt(W0, A, B, scaling))


def unmerge(W_merged, A, B, m, scaling, norm):
    """Undo merge: W0 = W' · ‖V'‖_c / m - s·B A, with norm = the stored ‖V'‖_c (out,).

    ‖V'‖_c cannot be recovered from W' alone (‖W'‖_c = |m| whatever V' was), so it must be kept
    at merge time. A row with m = 0 and ‖V'‖_c > 0 was erased by the merge and raises ValueError.
    """
    check_dora_arguments(None, W_merged, A, B, m, names=("x", "W_merged", "A", "B", "m"),
                         needs_x=False)
    check_array("norm", norm, 1)
    s = check_positive("scaling", scaling)
    if norm.shape[0] != W_merged.shape[0]:
        raise ValueError(f"norm: expected shape ({W_merged.shape[0]},) to match W_merged "
                         f"{W_merged.shape}, got {norm.shape}")
    if not np.all(norm >= 0):
        raise ValueError(f"norm: expected the stored row norms ‖V'‖_c >= 0, got negative or NaN "
                         f"values in rows {np.flatnonzero(~(norm >= 0)).tolist()}")
    erased = np.flatnonzero((m == 0) & (norm > 0))
    if erased.size:
        raise ValueError(f"m: rows {erased.tolist()} have magnitude 0, so merge wrote zeros there "
                         f"and W0 cannot be recovered")
    # V' = W' · ‖V'‖_c / m   (Eq. 5 solved for V')
    V = W_merged * _divide_or_zero(norm, m)[:, None]  # (out, in)
    # W0 = V' - s·B A        (Eq. 5)
    return V - s * (B @ A)  # (out, in)


def forward(x, W0, A, B, m, scaling, bias=None):
    """The DoRA layer: y = (m / ‖V'‖_c) ⊙ (x W0^T + s·(x A^T) B^T) + b, x (..., in) -> y (..., out).

    Equal to x W'^T + b with W' = merge(...), but computed as the layer computes it in training:
    the bias stays outside the scale, and B A is never multiplied out against x.
    """
    check_dora_arguments(x, W0, A, B, m, bias)
    s = check_positive("scaling", scaling)
    # Eq. 5: ‖V'‖_c, and the per-row scale c = m / ‖V'‖_c
    c = _divide_or_zero(m, row_norm(adapt(W0, A, B, s)))  # (out,)
    # y0 = x W0^T + s·(x A^T) B^T = x V'^T
    y0 = x @ W0.T + s * ((x @ A.T) @ B.T)  # (..., out)
    y = c * y0  # (..., out)
    return y if bias is None else y + bias


def magnitude_grad(V, grad_W):
    """Eq. 7: ∂L/∂m = (∂L/∂W' · V') / ‖V'‖_c, row by row. V, grad_W (out, in) -> (out,)."""
    # Eq. 7
    return _divide_or_zero(np.sum(grad_W * V, axis=1), row_norm(V))  # (out,)


def adapted_weight_grad(V, m, grad_W, detach_norm=True):
    """∂L/∂V' from ∂L/∂W' (out, in), V' (out, in) and m (out,).

    detach_norm=True  (Eq. 11): ‖V'‖_c is a constant, ∂L/∂V' = (m/‖V'‖_c) ∂L/∂W'.
    detach_norm=False (Eq. 6):  ∂L/∂V' = (m/‖V'‖_c) (I - V'V'^T/‖V'‖_c²) ∂L/∂W', the gradient with
    its component along the current direction V'_j projected away, row by row.
    """
    norm = row_norm(V)[:, None]  # (out, 1)
    scale = _divide_or_zero(m[:, None], norm)  # (out, 1): m / ‖V'‖_c
    if detach_norm:
        # Eq. 11
        return scale * grad_W  # (out, in)
    # Eq. 6: remove the part of ∂L/∂W'_j along the unit direction V'_j / ‖V'‖_c
    unit = _divide_or_zero(V, norm)  # (out, in)
    along = np.sum(grad_W * unit, axis=1, keepdims=True)  # (out, 1)
    return scale * (grad_W - along * unit)  # (out, in)


def backward(x, W0, A, B, m, scaling, grad_y, detach_norm=True):
    """Gradients of L with ∂L/∂y = grad_y (..., out) for y = forward(x, W0, A, B, m, scaling, bias).

    Returns {"x": (..., in), "A": (r, in), "B": (out, r), "m": (out,)}. W0 and the bias are frozen;
    the bias does not enter any of these gradients. detach_norm chooses Eq. 11 (True) or Eq. 6.
    """
    check_array("grad_y", grad_y)  # required here (check_dora_arguments takes None as absent)
    check_dora_arguments(x, W0, A, B, m, None, grad_y)
    s = check_positive("scaling", scaling)
    detach_norm = check_bool("detach_norm", detach_norm)
    x2 = x.reshape(-1, x.shape[-1])  # (T, in): every leading dim is a token
    G = grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
    V = adapt(W0, A, B, s)  # (out, in)
    W = recombine(m, V)  # (out, in)
    # y = x W'^T + b  =>  ∂L/∂x = G W',  ∂L/∂W' = G^T x
    grad_x = G @ W  # (T, in)
    grad_W = G.T @ x2  # (out, in)
    # Eq. 6 or Eq. 11
    grad_V = adapted_weight_grad(V, m, grad_W, detach_norm)  # (out, in)
    # V' = W0 + s·B A  =>  ∂L/∂B = s ∂L/∂V' A^T,  ∂L/∂A = s B^T ∂L/∂V'
    return {
        "x": grad_x.reshape(x.shape),
        "A": s * (B.T @ grad_V),  # (r, in)
        "B": s * (grad_V @ A.T),  # (out, r)
        "m": magnitude_grad(V, grad_W),  # (out,), Eq. 7
    }
