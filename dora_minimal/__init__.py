"""dora_minimal: DoRA (weight-decomposed low-rank adaptation), small, exact and readable.

    reference    the four steps and their gradients in NumPy, as the paper writes them
    functional   dora_linear: the same in PyTorch, with a hand-written backward
    scale        dora_scale: DoRA's per-channel scale for any layer, with a hand-written backward
    base         AdaptedLayer: what every adapted layer shares (merge, state, PEFT keys)
    layer        DoRALinear: an nn.Linear with a LoRA or DoRA adapter
    conv, embedding, gpt2_conv1d   DoRAConv1d/2d/3d, DoRAEmbedding, DoRAConv1D (transformers')
    adapters     LoraConfig, inject_adapters, merge_adapters, saving and PEFT interop
    analysis     the paper's magnitude/direction analysis (ΔM, ΔD)
"""

from . import reference
from .functional import DoRAFunction, dora_linear, lora_linear
from .scale import DoRAScale, dora_scale
from .base import AdaptedLayer
from .layer import DoRALinear
from .conv import DoRAConv1d, DoRAConv2d, DoRAConv3d
from .embedding import DoRAEmbedding
from .gpt2_conv1d import DoRAConv1D, is_transformers_conv1d
from .adapters import (LoraConfig, adapter_state_dict, from_peft_state_dict, inject_adapters,
                       load_adapter_state_dict, merge_adapters, to_peft_state_dict,
                       trainable_parameters)
from .analysis import decomposition_by_layer, effective_weights, magnitude_direction_change

__all__ = ["reference", "DoRAFunction", "dora_linear", "lora_linear", "DoRALinear", "DoRAScale",
           "dora_scale", "AdaptedLayer", "DoRAConv1d", "DoRAConv2d", "DoRAConv3d", "DoRAEmbedding",
           "DoRAConv1D", "is_transformers_conv1d", "LoraConfig",
           "inject_adapters", "merge_adapters", "adapter_state_dict", "load_adapter_state_dict",
           "to_peft_state_dict", "from_peft_state_dict", "trainable_parameters",
           "magnitude_direction_change", "effective_weights", "decomposition_by_layer"]
