"""DoRAConv1D: transformers' Conv1D (the GPT-2 family's linear layer) with a LoRA or DoRA adapter.

Hugging Face transformers' Conv1D(nf, nx) is a linear layer whose weight is stored transposed,
(in, out) = (nx, nf): y = x W + b. Its (out, in) view is W^T, and the rest is DoRALinear's math:

    y = (m / ‖W^T + s·B A‖_c) ⊙ (x W + s·drop(x) A^T B^T) + b      A (r, in), B (out, r), m (out,)

It is recognised without importing transformers: a module whose class is named "Conv1D", with an
integer `nf` and a 2-d `weight` of nf columns (is_transformers_conv1d). PEFT keys it as a linear
layer (lora_A.weight, lora_B.weight, lora_magnitude_vector) and saves "fan_in_fan_out": true.
to_base() returns the Conv1D class the layer was made from (from_base).
"""

import torch
from torch import nn
from torch.nn import functional as F

from .base import AdaptedLayer
from .checks import check_positive_int


def is_transformers_conv1d(module):
    """transformers' Conv1D (GPT-2), recognised by its class name and its (in, nf) weight."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(nf, int)
            and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] == nf)


class DoRAConv1D(AdaptedLayer):
    """transformers' Conv1D, y = x W + b with W (in, out), whose frozen weight is adapted by LoRA
    or DoRA.

    Args:
        in_features (Conv1D's nx), out_features (its nf).
        r, lora_alpha (scaling = lora_alpha / r), lora_dropout, use_dora, detach_norm: as
        DoRALinear.
        base_class: the Conv1D class that to_base() returns (from_base sets it).
    """
    BASE_TYPES = staticmethod(is_transformers_conv1d)
    WEIGHT_STORED_TRANSPOSED = True  # the (out, in') view is W^T
    FAN_IN_FAN_OUT = True  # PEFT saves "fan_in_fan_out": true for it

    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout=0.0,
                 use_dora=True, detach_norm=True, device=None, dtype=None, base_class=None):
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        super().__init__(r, lora_alpha, lora_dropout, use_dora, detach_norm, True, dtype)
        self.in_features, self.out_features, self.base_class = in_features, out_features, \
            base_class
        self._create_parameters((in_features, out_features), (self.r, in_features),
                                (out_features, self.r), out_features, True, device, dtype)

    @classmethod
    def _like(cls, conv1d, **kwargs):
        return cls(conv1d.weight.shape[0], conv1d.nf, base_class=type(conv1d), **kwargs)

    def _plain_module(self):
        if self.base_class is None:
            raise ValueError("to_base(): this layer was not made by from_base(), so it has no "
                             "Conv1D class to return; pass base_class= to the constructor")
        module = self.base_class(self.out_features, self.in_features)  # Conv1D(nf, nx)
        return module.to(device=self.weight.device, dtype=self.weight.dtype)

    def _init_base(self):
        """As transformers' Conv1D: weight normal with std 0.02, bias zero."""
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)


    def _base_op(self, x, W, b):
        return F.linear(x, W.T, b)  # x W + b

    def _lora_op(self, x):
        return F.linear(F.linear(x, self.lora_A), self.lora_B * self.scaling)  # s·(x A^T) B^T

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, use_dora={self.use_dora}, merged={self.merged}")
