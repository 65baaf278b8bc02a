"""dora_minimal: DoRA (weight-decomposed low-rank adaptation), small, exact and readable.

    reference    the four steps and their gradients in NumPy, as the paper writes them
    core         DoRAFunction: DoRA in PyTorch, its backward written by hand (the file to read)
    routes       the same computed another way where that is faster: merged_weight, blocked
    functional   dora_linear, lora_linear, dora_scale: the functional forms, with their checks
    base         AdaptedLayer: what every adapted layer shares (merge, state, PEFT keys)
    cache        cached_scale: DoRA's scale computed once while the adapter is only used
    layer        DoRALinear: an nn.Linear with a LoRA or DoRA adapter
    conv, embedding, gpt2_conv1d   DoRAConv1d/2d/3d, DoRAEmbedding, DoRAConv1D (transformers')
    adapters     LoraConfig, inject_adapters (get_peft_model), merge_adapters, reset_magnitude
    saving       adapter state dicts, PEFT's keys, save_pretrained / from_pretrained
    disable      disable_adapter: the base model's outputs for a block, nothing copied
    analysis     the paper's magnitude/direction analysis (ΔM, ΔD)

Importing the package imports nothing else: each name below is imported from its module when it
is first used (PEP 562), so `from dora_minimal import reference` needs NumPy only, and torch (a
few seconds to import) is loaded by the first PyTorch name, e.g. `dora_minimal.DoRALinear`.
"""

import importlib
import importlib.util

# {public name: the module that defines it}; a new public name is one line here
_NAMES = {
    "DoRAFunction": "core",
    "dora_linear": "functional", "lora_linear": "functional", "dora_scale": "functional",
    "AdaptedLayer": "base",
    "cached_scale": "cache",
    "DoRALinear": "layer",
    "DoRAConv1d": "conv", "DoRAConv2d": "conv", "DoRAConv3d": "conv",
    "DoRAEmbedding": "embedding",
    "DoRAConv1D": "gpt2_conv1d", "is_transformers_conv1d": "gpt2_conv1d",
    "LoraConfig": "adapters", "inject_adapters": "adapters", "get_peft_model": "adapters",
    "merge_adapters": "adapters", "merge_and_unload": "adapters", "adapter_layers": "adapters",
    "reset_magnitude": "adapters", "trainable_parameters": "adapters",
    "disable_adapter": "disable",
    "print_trainable_parameters": "adapters",
    "adapter_state_dict": "saving", "load_adapter_state_dict": "saving",
    "to_peft_state_dict": "saving", "from_peft_state_dict": "saving",
    "get_peft_model_state_dict": "saving", "set_peft_model_state_dict": "saving",
    "save_pretrained": "saving", "from_pretrained": "saving",
    "magnitude_direction_change": "analysis", "effective_weights": "analysis",
    "decomposition_by_layer": "analysis",
}

__all__ = ["reference", *_NAMES]


def __getattr__(name):
    """A public name, imported from its module on first use; or a submodule (dm.functional)."""
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif (name.isidentifier() and not name.startswith("_")
          and importlib.util.find_spec(f"{__name__}.{name}") is not None):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # the next use finds it without coming here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
