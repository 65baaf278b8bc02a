"""cached_scale: DoRA's scale computed once while the adapter is used and not trained.

An unmerged DoRA layer forms n = ‖W0 + s·B A‖_c on every call: out·in·r multiply-adds and a pass
over W0, where one token's product x W0^T costs out·in, so a token costs (r + 1)× its product
(tutorial chapter 8). While nothing trains, n does not change from call to call. Inside

    with dm.cached_scale(model), torch.no_grad():
        model.generate(...)

each DoRA layer computes c = m / n once and reuses it; a call is then LoRA's output
y0 = base(x; W0) + s·B(A(x)) and y = c ⊙ y0 + b, with the core's numbers (c as the core computes
it, y as DoRAFunction's forward rounds it).
"""

from contextlib import nullcontext

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .checks import check_dora_arguments
from .core import adapted_row_norm, along_channel, divide_or_zero
from .functional import check_same_device

_optimizer_steps = 0  # steps of any torch.optim optimizer while a cached_scale is active
_hook = None  # the post-step hook that counts them, registered while one is active
_active = 0  # how many cached_scale blocks are open


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


class cached_scale:
    """Within the block, every DoRA layer of `model` (an nn.Module, or one adapted layer) that
    runs without recording gradients computes its scale c = m / ‖W0 + s·B A‖_c once and reuses
    it, until something it depends on changes.

    Used by calls made with gradients off (torch.no_grad(), torch.inference_mode(); generate()
    turns them off itself), not under torch.compile (traced code computes c on every call, as
    outside), and for a DoRALinear only without torch.autocast. Every other call, a training
    step inside the block included, computes exactly as outside it, so gradients are never
    affected. Outside the block nothing is cached.

    c is computed again at the next call after: an in-place write to weight, lora_A, lora_B or
    magnitude (an optimizer step, load_state_dict, merge()/unmerge(), reset_magnitude(), a
    `copy_` under no_grad: each bumps the tensor's version counter); a parameter replaced
    (load_state_dict(assign=True), `param.data = ...`); .to(), .half(), .cuda(); a change of
    lora_alpha or scaling; and any torch.optim optimizer's step (fused optimizers write without
    bumping the version counter, so every step counts).

    What the layer cannot see: a write through `.data` (`layer.weight.data.copy_(w)`), through
    a NumPy view (`.numpy()`), or into the vector that torch.nn.utils.vector_to_parameters made
    the parameters views of (it assigns `.data`): those bypass the version counter. After one,
    call `refresh()` (`with dm.cached_scale(model) as cache: ... cache.refresh()`), or leave the
    block and enter it again. Layers added to `model` inside the block are not cached; a copy
    (copy.deepcopy) of a layer made inside starts uncached. Parameters that are inference
    tensors (made under torch.inference_mode) or vmap's batched tensors are not cached: those
    calls compute as outside. A cache adds one (out,) vector per layer, and holds the tensors
    it was computed from until the next call (torch.utils.swap_tensors works on them).
    """

    def __init__(self, model):
        from .base import AdaptedLayer  # (base imports this module)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module (a model or one adapted layer), got "
                            f"{type(model).__name__}")
        self.layers = [layer for layer in model.modules()
                       if isinstance(layer, AdaptedLayer) and layer.use_dora]
        self._installed = []  # per open block of this object: the layers it gave a cache

    def __enter__(self):
        global _hook, _active
        if _active == 0:
            _hook = register_optimizer_step_post_hook(_count_step)
        _active += 1
        # a layer already cached by an enclosing block keeps that block's cache
        installed = [layer for layer in self.layers if layer._scale_cache is None]
        for layer in installed:
            layer._scale_cache = ScaleCache()
        self._installed.append(installed)
        return self

    def __exit__(self, *exc):
        global _hook, _active
        for layer in self._installed.pop():
            layer._scale_cache = None
        _active -= 1
        if _active == 0:
            _hook.remove()
            _hook = None
        return False

    def refresh(self):
        """Forget every cached c (after a write the layers cannot see, through `.data`)."""
        for layer in self.layers:
            if layer._scale_cache is not None:
                layer._scale_cache.clear()


class ScaleCache:
    """One layer's c and the state it was computed from. A copy of the layer starts without it:
    deepcopy and pickle give None."""
    __slots__ = ("scale", "state", "refs")

    def __init__(self):
        self.clear()

    def clear(self):
        self.scale = self.state = None
        self.refs = (None,) * 8  # (no parameter is None)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


def cached_scale_of(layer, weight, lora_A, lora_B, magnitude):
    """c (out,) of a layer inside cached_scale, from its cache or computed now; None where the
    cache does not serve the call (outside the block, gradients recorded, torch.compile).
    weight, lora_A, lora_B, magnitude: the layer's parameters themselves (not views)."""
    cache = layer._scale_cache
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    # version counters (in-place writes), storages (replaced data) and the objects themselves
    try:
        state = (layer.scaling, _optimizer_steps, weight._version, lora_A._version,
                 lora_B._version, magnitude._version, weight.data_ptr(), lora_A.data_ptr(),
                 lora_B.data_ptr(), magnitude.data_ptr())
    except RuntimeError:  # inference tensors have no version counter, vmap's no storage
        return None  # (computed as outside the block)
    refs = cache.refs
    if (state != cache.state or refs[0] is not weight or refs[1] is not lora_A
            or refs[2] is not lora_B or refs[3] is not magnitude):
        cache.scale = layer_scale(layer)
        cache.state = state
        # held, not weak references: a weak one would make torch.utils.swap_tensors (and .to()
        # or load_state_dict under torch.__future__.set_swap_module_params_on_conversion)
        # refuse the parameter. Their storages are held too, so that no new storage can take
        # the address of one replaced through `.data =` (the pointers compared above)
        tensors = (weight, lora_A, lora_B, magnitude)
        cache.refs = tensors + tuple(t.untyped_storage() for t in tensors)
    return cache.scale


def layer_scale(layer):
    """c = m / ‖W0 + s·B A‖_c (out,) of an adapted layer, as the core computes it (in float32,
    float64 for float64 weights; autocast off), after the core's checks of the parameters."""
    weight, (A, B), m = layer._weight_view(layer.weight), layer._lora_views(), layer.magnitude
    check_dora_arguments(None, weight, A, B, m, array_type=torch.Tensor, needs_x=False,
                         names=("y0", "weight", "lora_A", "lora_B", "magnitude"))
    check_same_device(weight=weight, lora_A=A, lora_B=B, magnitude=m)
    with torch.autocast(weight.device.type, enabled=False) if \
            torch.amp.is_autocast_available(weight.device.type) else nullcontext():
        norm = adapted_row_norm(weight, A, B, layer.scaling)  # (out,): n = ‖V'‖_c
        return divide_or_zero(m.to(norm.dtype), norm)  # c = m / n, 0 for a zero row


def scale_output(y0, scale, bias, trailing_dims=0):
    """y = c ⊙ y0 + b for a given c (out,), computed and rounded as DoRAFunction's forward."""
    if trailing_dims:  # (out, 1, ..., 1): along y0's channel dim
        scale = along_channel(scale, trailing_dims)
        bias = None if bias is None else along_channel(bias, trailing_dims)
    y = y0 * scale if bias is None else torch.addcmul(bias, y0, scale)
    return y if y.dtype == y0.dtype else y.to(y0.dtype)
