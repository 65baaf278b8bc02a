"""Adapters in whole models: one config flag for LoRA or DoRA, inject, merge, save and load.

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "fc2"], use_dora=True)
    model = inject_adapters(model, config)       # nn.Linear -> DoRALinear, the rest frozen
    ...train...
    state = adapter_state_dict(model)            # only lora_A, lora_B, magnitude
    model = merge_adapters(model)                # DoRALinear -> nn.Linear holding W'

The field names follow Hugging Face PEFT's LoraConfig, and to_peft_state_dict /
from_peft_state_dict read and write PEFT's saved-adapter keys, without depending on PEFT.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from .checks import check_bool, check_dropout, check_positive, check_rank
from .layer import DoRALinear

ADAPTER_TENSORS = ("lora_A", "lora_B", "magnitude")


@dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get an adapter, and which adapter (PEFT's field names).

    r: rank; lora_alpha: scaling = lora_alpha / r; lora_dropout: on the adapter branch's input;
    target_modules: names matched against the end of each module's dotted name
    ("fc1" matches "encoder.0.fc1"), or None for every nn.Linear; use_dora: DoRA or plain LoRA.
    """
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Optional[Sequence[str]] = None
    use_dora: bool = False

    def __post_init__(self):
        check_rank(self.r)
        check_positive("lora_alpha", self.lora_alpha)
        check_dropout(self.lora_dropout)
        check_bool("use_dora", self.use_dora)
        targets = self.target_modules
        if targets is None:
            return
        if isinstance(targets, str) or not isinstance(targets, (list, tuple, set, frozenset)):
            raise TypeError(f"target_modules: expected a list of module names or None, "
                            f"got {targets!r}")
        if len(targets) == 0:
            raise ValueError("target_modules: expected at least one module name (or None for "
                             "every nn.Linear), got an empty list")
        bad = [t for t in targets if not isinstance(t, str) or not t]
        if bad:
            raise TypeError(f"target_modules: expected non-empty strings, got {bad!r}")
        object.__setattr__(self, "target_modules", tuple(targets))


def _matches(name, target):
    return name == target or name.endswith("." + target)


def adapter_layers(model):
    """[(dotted name, DoRALinear)] for every adapter layer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoRALinear)]


def _replace(model, name, new_module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new_module)


def inject_adapters(model, config):
    """Replace each targeted nn.Linear by a DoRALinear (in place), freeze every other parameter,
    and return the model. A target that matches no nn.Linear raises ValueError listing the
    model's linear layers; on any error the model is unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a dora_minimal.LoraConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise ValueError("model: already has adapter layers; merge_adapters() it first")
    if isinstance(model, nn.Linear):
        raise ValueError("model: is itself an nn.Linear, which cannot be replaced in place; "
                         "use DoRALinear.from_linear(model, ...) or wrap it in a module")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               # nn.MultiheadAttention reads its out_proj's weight directly: not adaptable
               and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    if config.target_modules is None:
        targets = linears
    else:
        unmatched = [t for t in config.target_modules if not any(_matches(n, t) for n in linears)]
        if unmatched:
            raise ValueError(f"target_modules: {unmatched} match no nn.Linear of the model; "
                             f"its linear layers are {linears}")
        targets = [n for n in linears if any(_matches(n, t) for t in config.target_modules)]
    if not targets:
        raise ValueError("model: has no nn.Linear layer to adapt")
    adapters = [(name, DoRALinear.from_linear(model.get_submodule(name), config.r,
                                              config.lora_alpha, config.lora_dropout,
                                              config.use_dora))
                for name in targets]  # all built before the model is touched
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, adapter in adapters:
        _replace(model, name, adapter)
    return model


def merge_adapters(model):
    """Replace every adapter layer by a plain nn.Linear holding the merged weight W'."""
    layers = adapter_layers(model)
    merged = [(name, layer.to_linear()) for name, layer in layers]  # all checked before any swap
    for name, linear in merged:
        _replace(model, name, linear)
    return model


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self):
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self):
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def trainable_parameters(model):
    """(trainable, total) parameter counts; str() prints them as PEFT does."""
    return ParameterCount(sum(p.numel() for p in model.parameters() if p.requires_grad),
                          sum(p.numel() for p in model.parameters()))


def _adapter_tensors(model, key_of=lambda name, key: f"{name}.{key}"):
    """{key_of(layer name, "lora_A" | "lora_B" | "magnitude"): the tensor itself} for every
    adapter tensor in the model (a LoRA layer has no magnitude)."""
    return {key_of(name, key): getattr(layer, key) for name, layer in adapter_layers(model)
            for key in ADAPTER_TENSORS if getattr(layer, key) is not None}


def adapter_state_dict(model):
    """{"<layer>.lora_A": ..., "<layer>.lora_B": ..., "<layer>.magnitude": ...}, detached copies."""
    return {key: tensor.detach().clone() for key, tensor in _adapter_tensors(model).items()}


def _check_and_copy(model, state, targets, what):
    """Copy state[key] into targets[key] for all keys, or raise and change nothing."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict of tensors, got {type(state).__name__}")
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    for key, target in targets.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: {key} expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{what}: {key} expected shape {tuple(target.shape)}, "
                             f"got {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{what}: {key} expected a floating dtype, got {value.dtype}")
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"{what}: layers {merged} are merged; unmerge() them first")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])
    return model


def load_adapter_state_dict(model, state):
    """Load what adapter_state_dict saved. Names and shapes must match exactly; on a mismatch
    ValueError says which, and the model is unchanged."""
    return _check_and_copy(model, state, _adapter_tensors(model), "load_adapter_state_dict")


PEFT_PREFIX = "base_model.model."
PEFT_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
             "magnitude": "lora_magnitude_vector"}


def _peft_targets(model):
    return _adapter_tensors(model, lambda name, key: f"{PEFT_PREFIX}{name}.{PEFT_KEYS[key]}")


def to_peft_state_dict(model):
    """The adapter under PEFT's saved-adapter keys (as get_peft_model_state_dict returns them):
    base_model.model.<path>.lora_A.weight, .lora_B.weight and .lora_magnitude_vector."""
    return {key: tensor.detach().clone() for key, tensor in _peft_targets(model).items()}


def from_peft_state_dict(model, state):
    """Load an adapter saved by PEFT (or by to_peft_state_dict) into a model with the same
    adapter layers. Keys and shapes must match; on a mismatch the model is unchanged."""
    return _check_and_copy(model, state, _peft_targets(model), "from_peft_state_dict")
