"""The functional forms: dora_linear, lora_linear and dora_scale, with their argument checks.

    dora_linear   a linear layer's DoRA: y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·(x A^T) B^T) + b
    lora_linear   plain LoRA (Eq. 1): y = x W0^T + s·(x A^T) B^T + b, by ordinary autograd
    dora_scale    DoRA's step for any layer: y = (m / ‖W0 + s·B A‖_c) ⊙ y0 + b

The math is dora_minimal.core's DoRAFunction; dora_linear may take one of dora_minimal.routes,
which compute the same. Under torch.autocast they compute as nn.Linear would (in autocast's
dtype), while the magnitude, the norms and the scale c stay float32.
"""

import torch
from torch.nn import functional as F

from .checks import check_array, check_bool, check_dora_arguments, check_positive
from .core import dora_scale_unchecked, linear_lora_output
from .routes import choose_route, dora_linear_route


def autocast_dtype(x):
    """The dtype torch.autocast computes linear layers in on x's device, or None when it is off
    (or x is float64, which autocast leaves alone, as it does for nn.Linear)."""
    if not isinstance(x, torch.Tensor) or x.dtype == torch.float64:
        return None
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(dtype, *tensors):
    """Floating tensors in `dtype` (differentiably); None stays None."""
    return [t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors]


def check_functional_arguments(x, weight, lora_A, lora_B, magnitude, bias, scaling, use_dora=True):
    """Validate the arguments of dora_linear / lora_linear (types, shapes, dtypes, devices);
    returns the scaling as a float."""
    names = ("x", "weight", "lora_A", "lora_B", "magnitude")
    check_dora_arguments(x, weight, lora_A, lora_B, magnitude, bias,
                         array_type=torch.Tensor, names=names, needs_m=use_dora)
    given = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B,
             "magnitude": magnitude, "bias": bias}
    check_same_device(**given)
    for name in ("x", "lora_A", "lora_B", "bias"):
        if given[name] is not None and given[name].dtype != weight.dtype:
            raise TypeError(f"{name}: expected dtype {weight.dtype} (weight's), "
                            f"got {given[name].dtype}")
    check_frozen(weight)
    if torch.compiler.is_compiling():  # a symbolic float there; eager calls check it
        return scaling
    return check_positive("scaling", scaling)


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_frozen(weight):
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: expected a frozen weight (requires_grad=False); DoRA trains "
                         "lora_A, lora_B and magnitude, and computes no gradient for weight "
                         "(with torch.func, differentiate only those three and pass the frozen "
                         "weight and bias to functional_call separately)")


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
        x, weight, lora_A, lora_B, bias, lora_input = _cast(dtype, x, weight, lora_A, lora_B,
                                                            bias, lora_input)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias,
                               detach_norm, lora_input=lora_input)
    s = check_functional_arguments(x, weight, lora_A, lora_B, magnitude, bias, scaling)
    detach_norm = check_bool("detach_norm", detach_norm)
    if lora_input is not None:
        check_array("lora_input", lora_input, None, torch.Tensor)
        if (lora_input.shape, lora_input.dtype, lora_input.device) != (x.shape, x.dtype,
                                                                       x.device):
            raise ValueError(f"lora_input: expected x's shape {tuple(x.shape)}, dtype {x.dtype} "
                             f"and device {x.device}, got {tuple(lora_input.shape)}, "
                             f"{lora_input.dtype} and {lora_input.device}")
    return dora_linear_checked(x, lora_input, weight, lora_A, lora_B, magnitude, bias, s,
                               detach_norm)


def dora_linear_checked(x, lora_input, weight, lora_A, lora_B, magnitude, bias, scaling,
                        detach_norm):
    """dora_linear after its checks: the route choose_route picks (dora_minimal.routes)."""
    route = choose_route(x, lora_input, weight, torch.is_grad_enabled())
    return dora_linear_route(route, x, lora_input, weight, lora_A, lora_B, magnitude, bias,
                             scaling, detach_norm)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, *, lora_input=None):
    """Plain LoRA (Eq. 1): y = x W0^T + s·(x A^T) B^T + b, by ordinary autograd."""
    dtype = autocast_dtype(x)
    if dtype is not None:  # run in autocast's dtype, as nn.Linear would
        x, weight, lora_A, lora_B, bias, lora_input = _cast(dtype, x, weight, lora_A, lora_B,
                                                            bias, lora_input)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, lora_input=lora_input)
    s = check_functional_arguments(x, weight, lora_A, lora_B, None, bias, scaling, use_dora=False)
    return lora_forward(x, weight, lora_A, lora_B, s, bias, lora_input)


def lora_forward(x, weight, lora_A, lora_B, scaling, bias=None, lora_input=None):
    """lora_linear without the argument checks (for callers that made them)."""
    return linear_lora_output(x, weight, lora_A, lora_B, scaling, lora_input, bias)


def dora_scale(y0, weight, lora_A, lora_B, magnitude, scaling, bias=None, detach_norm=True,
               trailing_dims=0):
    """y = (m / ‖W0 + s·B A‖_c) ⊙ y0 + b (same shape and dtype as y0), by core.DoRAFunction.

    y0 (..., out, *trailing): the layer's LoRA output without bias; weight (out, in') frozen,
    lora_A (r, in'), lora_B (out, r): the layer's views; magnitude (out,); bias (out,) or None;
    trailing_dims: the number of dims of y0 after its channel dim. Under torch.autocast the
    scale is computed with autocast off: the norms and c in float32, from the weights as they are.
    """
    check_dora_arguments(None, weight, lora_A, lora_B, magnitude, bias, array_type=torch.Tensor,
                         names=("y0", "weight", "lora_A", "lora_B", "magnitude"), needs_x=False)
    check_array("y0", y0, None, torch.Tensor)  # (a floating dtype: autocast's may differ)
    check_same_device(y0=y0, weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude,
                      bias=bias)
    check_frozen(weight)
    if isinstance(trailing_dims, bool) or not isinstance(trailing_dims, int) or not (
            0 <= trailing_dims < y0.ndim):
        raise ValueError(f"trailing_dims: expected an integer from 0 to y0.ndim - 1 = "
                         f"{y0.ndim - 1}, got {trailing_dims!r}")
    channel = y0.ndim - 1 - trailing_dims
    if y0.shape[channel] != weight.shape[0]:
        raise ValueError(f"y0: expected {weight.shape[0]} channels (weight's out) in dim "
                         f"{channel} (then {trailing_dims} trailing dims), got shape "
                         f"{tuple(y0.shape)}")
    s = scaling if torch.compiler.is_compiling() else check_positive("scaling", scaling)
    detach_norm = check_bool("detach_norm", detach_norm)
    args = (y0, weight, lora_A, lora_B, magnitude, bias, s, detach_norm, trailing_dims)
    if autocast_dtype(y0) is not None:
        with torch.autocast(y0.device.type, enabled=False):
            return dora_scale_unchecked(*args)
    return dora_scale_unchecked(*args)
