"""disable_adapter: switch every adapter of a model off for a block, as PEFT's
`with model.disable_adapter():`, to get the base model's outputs without a second copy of it
(the reference model of DPO, a before/after evaluation).

Inside the block each adapted layer computes its base layer's own op with its frozen W0 and bias,
base(x; W0) + b: the same function nn.Linear (nn.Conv2d, nn.Embedding, Conv1D) computes, so the
outputs are the base model's bit for bit, in train mode and with dropout too (the adapter's
dropout is not run). Gradients flow only to what the base uses (x, and W0 or b if they require
it): lora_A, lora_B and the magnitude get none. Nothing is copied or written: a counter per layer
is raised on entry and lowered on exit, also when the block raises, so blocks nest. (A copy made
inside the block, by copy.deepcopy or pickle, copies the counter: its adapters stay off.)
"""

import contextlib
import warnings

from torch import nn

from .base import AdaptedLayer


@contextlib.contextmanager
def disable_adapter(model):
    """Within the block, every adapted layer of `model` (an nn.Module holding adapted layers, or
    one adapted layer) computes its base layer exactly; after it, the adapted outputs again.

    A merged layer holds W' in its weight, and W0 = W'·‖V'‖_c/m - s·B A recovered from it would
    not be the base's W0 bit for bit: ValueError names the merged layers, before anything
    changes (unmerge() them first). Modules trained in full (modules_to_save) keep their trained
    weights, since no copy of the original is kept (PEFT keeps one and switches to it): a
    UserWarning names them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [(name or type(model).__name__, module) for name, module in model.named_modules()
              if isinstance(module, AdaptedLayer)]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no adapter layers, so there is no "
                         f"adapter to switch off (after merge_adapters the adapter is part of "
                         f"the weights)")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"disable_adapter: layers {merged} are merged, so their weights hold W′, "
                         f"not the base's W0; unmerge() them first")
    from .adapters import saved_modules
    trained = [name for name, _ in saved_modules(model)]
    if trained:
        warnings.warn(f"disable_adapter: the modules {trained} are trained in full "
                      f"(modules_to_save) and keep their trained weights inside the block: no "
                      f"copy of their original weights is kept", stacklevel=3)
    for _, layer in layers:
        layer._adapter_off = layer._adapter_off + 1
    try:
        yield model
    finally:
        for _, layer in layers:
            layer._adapter_off = layer._adapter_off - 1
