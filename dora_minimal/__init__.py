"""dora_minimal: DoRA (weight-decomposed low-rank adaptation), small, exact and readable.

    reference    the four steps and their gradients in NumPy, as the paper writes them
    functional   dora_linear: the same in PyTorch, with a hand-written backward
    scale        dora_scale: DoRA's per-channel scale for any layer, with a hand-written backward
    base         AdaptedLayer: what every adapted layer shares (merge, state, PEFT keys)
    layer        DoRALinear: an nn.Linear with a LoRA or DoRA adapter
    conv, embedding, gpt2_conv1d   DoRAConv1d/2d/3d, DoRAEmbedding, DoRAConv1D (transformers')
    adapters     LoraConfig, inject_adapters (get_peft_model), merge_adapters, reset_magnitude
    saving       adapter state dicts, PEFT's keys, save_pretrained / from_pretrained
    analysis     the paper's magnitude/direction analysis (ΔM, ΔD)
"""

from . import reference
from .core import DoRAFunction
from .functional import dora_linear, lora_linear
from .functional import dora_scale  # noqa: F811
from .base import AdaptedLayer
from .layer import DoRALinear
from .conv import DoRAConv1d, DoRAConv2d, DoRAConv3d
from .embedding import DoRAEmbedding
from .gpt2_conv1d import DoRAConv1D, is_transformers_conv1d
from .adapters import (LoraConfig, adapter_layers, get_peft_model, inject_adapters,
                       merge_adapters, merge_and_unload, print_trainable_parameters,
                       reset_magnitude, trainable_parameters)
from .saving import (adapter_state_dict, from_peft_state_dict, from_pretrained,
                     get_peft_model_state_dict, load_adapter_state_dict, save_pretrained,
                     set_peft_model_state_dict, to_peft_state_dict)
from .analysis import decomposition_by_layer, effective_weights, magnitude_direction_change

__all__ = ["reference", "DoRAFunction", "dora_linear", "lora_linear", "DoRALinear",
           "dora_scale", "AdaptedLayer", "DoRAConv1d", "DoRAConv2d", "DoRAConv3d", "DoRAEmbedding",
           "DoRAConv1D", "is_transformers_conv1d", "LoraConfig",
           "inject_adapters", "get_peft_model", "merge_adapters", "merge_and_unload",
           "adapter_layers", "reset_magnitude", "trainable_parameters",
           "print_trainable_parameters", "adapter_state_dict", "load_adapter_state_dict",
           "to_peft_state_dict", "from_peft_state_dict", "get_peft_model_state_dict",
           "set_peft_model_state_dict", "save_pretrained", "from_pretrained",
           "magnitude_direction_change", "effective_weights", "decomposition_by_layer"]
