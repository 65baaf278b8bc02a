"""DoRA in PyTorch: a torch.autograd.Function whose backward is written by hand.

The same equations as dora_minimal.reference (read that first), computed the way a GPU likes:

    V' = W0 + s·B A                      never formed: no (out, in) temporary while training
    ‖V'‖_c² = ‖W0‖_c² + 2s·rowsum(B ⊙ U) + s²·rowsum((B AA^T) ⊙ B),   U = W0 A^T (out, r)
    c = m / ‖V'‖_c                        (out,), in float32 (float64 for float64 inputs)
    y0 = x W0^T + s·(x A^T) B^T          (T, out)
    y = c ⊙ y0 + b

Backward, with G = ∂L/∂y (T, out) and Gc = G ⊙ c:
    Eq. 7   ∂L/∂m = Σ_t G ⊙ y0 / ‖V'‖_c
    Eq. 11  ∂L/∂x = Gc W0 + s·(Gc B) A,  ∂L/∂A = s·(Gc B)^T x,
            ∂L/∂B = s·Gc^T (x A^T) = s·c ⊙ G^T (x A^T)
    Eq. 6   exact mode adds the norm's path: ∂L/∂V'_j += k_j V'_j, k = -m ⊙ Σ_t(G ⊙ y0) / ‖V'‖_c³,
            so ∂L/∂B += s·k ⊙ (U + s·B AA^T) and ∂L/∂A += s·(k ⊙ B)^T (W0 + s·B A), the last
            product taken as (k ⊙ B)^T W0 + s·((k ⊙ B)^T B) A to keep away from (out, in).
Forward and backward let the big product add onto the low-rank one (its beta), so the addition
happens while the big product computes instead of in a memory-bound pass of its own. Backward
forms G ⊙ c and G ⊙ y0 a block of tokens at a time, in one buffer: its peak memory is y0, y,
∂L/∂x and at most a quarter of a (T, out) tensor. A row with ‖V'‖_c = 0 gets c = 0 and no
gradient through its norm (the zero-row rule).
"""

import torch
from torch.nn import functional as F

from .checks import check_bool, check_dora_arguments, check_positive


def accumulation_dtype(dtype):
    """Norms, the scale c and ∂L/∂m are computed in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _divide_or_zero(numerator, denominator):
    """numerator / denominator, and 0 where the denominator is 0 (the zero-row rule)."""
    return torch.where(denominator != 0, numerator / denominator, 0.0)


def scale_outputs(y0, c, bias=None):
    """y = c ⊙ y0 + b (..., out) in y0's dtype: the product is taken in c's float32 (or float64)
    and rounded once, where y0 * c would return float32."""
    y = torch.empty_like(y0)
    return torch.mul(y0, c, out=y) if bias is None else torch.addcmul(bias, y0, c, out=y)


def weight_norm_sq(weight):
    """‖W0‖_c² (out,) in the accumulation dtype: constant while W0 is frozen, so cacheable."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=accumulation_dtype(weight.dtype)) ** 2


def adapted_row_norm(weight, lora_A, lora_B, scaling, base_norm_sq=None):
    """‖V'‖_c = ‖W0 + s·B A‖_c (out,) from the factored form, without forming V' (out, in).

    Returns (norm, U, AAt) in the accumulation dtype; U = W0 A^T (out, r) and AAt = A A^T (r, r)
    are reused by the exact backward.
    """
    acc = accumulation_dtype(weight.dtype)
    if base_norm_sq is None:
        base_norm_sq = weight_norm_sq(weight)  # (out,)
    U = (weight @ lora_A.T).to(acc)  # (out, r)
    A, B = lora_A.to(acc), lora_B.to(acc)
    AAt = A @ A.T  # (r, r)
    # ‖w_j + s b_j A‖² = ‖w_j‖² + 2s b_j·(W0 A^T)_j + s² b_j (A A^T) b_j^T
    #                  = ‖w_j‖² + s b_j·(2U + s B AA^T)_j
    cross = torch.addmm(U, B, AAt, beta=2, alpha=scaling)  # (out, r): 2U + s·B AA^T
    norm_sq = torch.add(base_norm_sq, (B * cross).sum(1), alpha=scaling)  # (out,)
    return norm_sq.clamp_min(0).sqrt(), U, AAt


class DoRAFunction(torch.autograd.Function):
    """y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·(x_a A^T) B^T) + b with a hand-written backward.

    x_a is the adapter branch's input (dropout(x) in training, else x itself). W0 is frozen.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, lora_A, lora_B, magnitude, bias, scaling,
                base_norm_sq, detach_norm):
        lead, in_features, out_features = x.shape[:-1], weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, in_features)  # (T, in)
        xa2 = x2 if x_adapter is None else x_adapter.reshape(-1, in_features)  # (T, in)
        xA = xa2 @ lora_A.T  # (T, r)
        # y0 = s·(x A^T) B^T + x W0^T: the big product adds onto the low-rank one inside the
        # matmul (beta = s), while it computes, not in a pass over y0 of its own
        y0 = xA @ lora_B.T  # (T, out)
        y0.addmm_(x2, weight.T, beta=scaling)
        norm, U, AAt = adapted_row_norm(weight, lora_A, lora_B, scaling, base_norm_sq)  # (out,)
        # c = m / ‖V'‖_c, kept in float32 so a small change of m survives in bf16
        c = _divide_or_zero(magnitude.to(norm.dtype), norm)  # (out,)
        y = scale_outputs(y0, c, bias)  # y = c ⊙ y0 + b
        # y0 (T, out) is kept only for Eq. 7 and the exact mode's norm path, U and AAt only for
        # the latter
        needs_y0 = ctx.needs_input_grad[5] or not detach_norm
        ctx.save_for_backward(x2, xa2 if x_adapter is not None else None, weight, lora_A, lora_B,
                              magnitude, c, norm, xA, y0 if needs_y0 else None,
                              *((None, None) if detach_norm else (U, AAt)))
        ctx.scaling, ctx.detach_norm, ctx.lead = scaling, detach_norm, lead
        return y.reshape(*lead, out_features)

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa2, weight, lora_A, lora_B, magnitude, c, norm, xA, y0, U, AAt = ctx.saved_tensors
        s = ctx.scaling
        needs = ctx.needs_input_grad  # x, x_adapter, weight, A, B, m, bias, ...
        G = grad_y.reshape(-1, weight.shape[0])  # (T, out)
        grad_xa = grad_A = grad_B = grad_m = grad_bias = None
        exact = not ctx.detach_norm and (needs[3] or needs[4])
        tokens, out_features = G.shape
        size = _block_tokens(tokens, weight.shape[1], out_features)
        starts = range(0, tokens, size)
        # Σ_t G ⊙ y0 (out,) is summed a block at a time, in float32, one row per block
        block_sums = c.new_empty(len(starts), out_features) if needs[5] or exact else None
        GcB = G.new_empty(tokens, lora_B.shape[1]) if needs[0] or needs[1] or needs[3] else None
        grad_x = torch.empty_like(x2) if needs[0] else None  # (T, in)
        # One pass over blocks of tokens, with one (t, out) buffer for G ⊙ c and then G ⊙ y0, so
        # that no (T, out) temporary is alive beside y0, y and ∂L/∂x.
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
        g = block_sums.sum(0) if block_sums is not None else None  # Σ_t G ⊙ y0 (out,)
        if needs[5]:
            # Eq. 7: ∂L/∂m = Σ_t G ⊙ y0 / ‖V'‖_c
            grad_m = _divide_or_zero(g, norm).to(magnitude.dtype)
        if grad_x is not None:
            grad_x = grad_x.reshape(*ctx.lead, weight.shape[1])
        if needs[1]:
            grad_xa = (s * (GcB @ lora_A)).reshape(*ctx.lead, weight.shape[1])  # (..., in)
        if needs[3]:
            grad_A = s * (GcB.T @ (x2 if xa2 is None else xa2))  # (r, in): s·(Gc B)^T x
        if needs[4]:
            # s·Gc^T (x A^T) = s·c ⊙ G^T (x A^T) (out, r), from G in one product
            grad_B = torch.mm(G.T, xA).mul_((s * c)[:, None])
        if exact:
            # Eq. 6, the norm's path: ∂L/∂V'_j += k_j V'_j, k = -m Σ_t(G ⊙ y0) / ‖V'‖_c³
            k = _divide_or_zero(-magnitude.to(norm.dtype) * g, norm**3)  # (out,)
            B_acc = lora_B.to(k.dtype)
            kB = k[:, None] * B_acc  # (out, r)
            if needs[3]:
                # s·(k ⊙ B)^T V' = s·((k ⊙ B)^T W0 + s·((k ⊙ B)^T B) A); the product with W0 runs
                # in W0's dtype, on k ⊙ B divided by its largest entry so that fp16 cannot overflow
                largest = kB.abs().max().clamp_min(torch.finfo(k.dtype).tiny)
                kBtW0 = ((kB / largest).T.to(weight.dtype) @ weight).to(k.dtype) * largest
                kBtV = kBtW0 + s * (kB.T @ B_acc) @ lora_A.to(k.dtype)  # (r, in)
                grad_A = grad_A + (s * kBtV).to(grad_A.dtype)  # (r, in)
            if needs[4]:
                # s·k ⊙ (V' A^T) = s·k ⊙ (U + s·B AA^T)
                grad_B = grad_B + (s * k[:, None] * (U + s * B_acc @ AAt)).to(grad_B.dtype)
        if needs[6]:
            grad_bias = G.sum(0)
        return grad_x, grad_xa, None, grad_A, grad_B, grad_m, grad_bias, None, None, None


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
                         "lora_A, lora_B and magnitude, and computes no gradient for weight")
    return check_positive("scaling", scaling)


def autocast_dtype(x):
    """The dtype torch.autocast computes linear layers in on x's device, or None when it is off."""
    if (isinstance(x, torch.Tensor) and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _caster(dtype):
    """t -> t in `dtype` (differentiably), for floating tensors; anything else is left as it is."""
    return lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, detach_norm=True,
                *, lora_input=None, base_norm_sq=None):
    """DoRA's linear map y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·(x A^T) B^T) + b.

    x (..., in), weight (out, in) frozen, lora_A (r, in), lora_B (out, r), magnitude (out,),
    scaling = lora_alpha / r, bias (out,) or None. Returns (..., out) in x's dtype.
    Gradients reach x, lora_A, lora_B, magnitude (and bias if it requires grad).
    detach_norm=True treats ‖V'‖_c as a constant in backward (Eq. 11, as PEFT); False gives the
    exact gradient (Eq. 6). lora_input: the adapter branch's input if not x (dropout(x)).
    base_norm_sq: ‖weight‖_c² (see weight_norm_sq), if cached.
    """
    dtype = autocast_dtype(x)
    if dtype is not None:  # run in autocast's dtype, as nn.Linear would; m and c stay float32
        cast = _caster(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(cast(x), cast(weight), cast(lora_A), cast(lora_B), magnitude,
                               scaling, cast(bias), detach_norm, lora_input=cast(lora_input),
                               base_norm_sq=base_norm_sq)
    s = check_functional_arguments(x, weight, lora_A, lora_B, magnitude, bias, scaling)
    detach_norm = check_bool("detach_norm", detach_norm)
    if lora_input is not None and lora_input.shape != x.shape:
        raise ValueError(f"lora_input: expected x's shape {tuple(x.shape)}, "
                         f"got {tuple(lora_input.shape)}")
    return DoRAFunction.apply(x, lora_input, weight, lora_A, lora_B, magnitude, bias, s,
                              base_norm_sq, detach_norm)


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
    y = F.linear(x2, weight, bias).addmm_(xa2 @ lora_A.T, lora_B.T, alpha=scaling)
    return y.reshape(*lead, weight.shape[0])


def merged_weight(weight, lora_A, lora_B, scale, scaling):
    """W' = c ⊙ (W0 + s·B A) (out, in) in W0's dtype, given the scale c = m / ‖V'‖_c (out,).

    The product with c is taken in float32 and rounded once. This forms (out, in): it is for
    inference without gradients, not for training (merge() works in float64 instead).
    """
    V = torch.addmm(weight, lora_B, lora_A, alpha=scaling)  # (out, in): W0 + s·B A
    return torch.mul(V, scale[:, None], out=V)
