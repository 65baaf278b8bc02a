"""DoRALinear: an nn.Linear with a LoRA or DoRA adapter that drops into any model.

    y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·drop(x) A^T B^T) + b     use_dora=True
    y = x W0^T + s·drop(x) A^T B^T + b                               use_dora=False (LoRA)

Parameters are named as in PEFT: `weight` and `bias` (frozen, copied from the pretrained linear),
`lora_A` (r, in), `lora_B` (out, r) and `magnitude` (out,). Dropout acts on the adapter branch
only, so training costs no second base matmul and eval mode equals the merged layer (PEFT applies
the scale to a dropped-out base branch too when dropout > 0; both agree when dropout is 0).
What every adapted layer shares (reset, merge, state, PEFT keys, the input checks) is in
dora_minimal.base. Its DoRA is dora_minimal.core's, by way of dora_linear, which may take one of
the named routes of dora_minimal.routes (a toy model's steps take `merged_weight`).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import AdaptedLayer
from .cache import cached_scale_of, scale_output
from .checks import check_positive_int
from .core import linear_lora_output
from .functional import (autocast_dtype, dora_linear, dora_linear_checked, lora_forward,
                         lora_linear)


class DoRALinear(AdaptedLayer):
    """A linear layer y = x W^T + b whose frozen weight is adapted by LoRA or DoRA.

    Args:
        in_features, out_features: as nn.Linear.
        r: rank of the update B A; lora_alpha: its scale numerator, scaling = lora_alpha / r.
        lora_dropout: dropout probability on the adapter branch's input.
        bias: whether the layer has a (frozen) bias.
        use_dora: DoRA (True) or plain LoRA (False).
        detach_norm: DoRA's backward treats ‖V'‖_c as a constant (Eq. 11, default) or not (Eq. 6).
    """
    BASE_TYPES = (nn.Linear,)
    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout=0.0, bias=True,
                 use_dora=True, detach_norm=True, device=None, dtype=None):
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        super().__init__(r, lora_alpha, lora_dropout, use_dora, detach_norm, bias, dtype)
        self.in_features, self.out_features = in_features, out_features
        self._create_parameters((out_features, in_features), (self.r, in_features),
                                (out_features, self.r), out_features, bias, device, dtype)

    @classmethod
    def _like(cls, linear, **kwargs):
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   **kwargs)

    @classmethod
    def from_linear(cls, linear, r, lora_alpha, lora_dropout=0.0, use_dora=True,
                    detach_norm=True):
        """The same as from_base (every layer kind's name for it), kept for nn.Linear."""
        return cls.from_base(linear, r, lora_alpha, lora_dropout, use_dora, detach_norm)

    @classmethod
    def adapts(cls, module):
        """nn.Linear and its subclasses that keep nn.Linear's forward, but not
        nn.MultiheadAttention's out_proj, whose weight the attention reads directly (a subclass
        with a forward of its own computes something DoRALinear would not)."""
        return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
                and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear))

    def _init_base(self):
        """As nn.Linear initializes its weight and bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)


    def _base_op(self, x, W, b):
        return F.linear(x, W, b)

    def _plain_module(self):
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x):
        """AdaptedLayer's forward, written for nn.Linear: dora_linear (or lora_linear) on the
        layer's parameters, after a quick check that they and x are as the layer made them."""
        W, A, B, m, bias, s = (self.weight, self.lora_A, self.lora_B, self.magnitude, self.bias,
                               self.scaling)
        quick = autocast_dtype(x) is None and self._well_formed(x, W, A, B, m, bias)
        if not quick:
            self._check_input(x)  # names the layer; the functional forms check the rest
        if self._adapter_off:  # inside dora_minimal.disable_adapter
            return self._base_forward(x)
        if self.merged:
            self._warn_if_training_merged()
            return F.linear(x, W, bias)
        x_a = self.dropout(x) if self.training and self.lora_dropout > 0 else None
        if not quick:  # the functional forms check everything, and compute under autocast
            if not self.use_dora:
                return lora_linear(x, W, A, B, s, bias, lora_input=x_a)
            return dora_linear(x, W, A, B, m, s, bias, self.detach_norm, lora_input=x_a)
        if not self.use_dora:
            return lora_forward(x, W, A, B, s, bias, x_a)
        if self._scale_cache is not None:  # inside cached_scale: c from the cache, if it serves
            c = cached_scale_of(self, W, A, B, m)
            if c is not None:  # y = c ⊙ (x W0^T + s·(x_a A^T) B^T) + b
                return scale_output(linear_lora_output(x, W, A, B, s, x_a), c, bias)
        return dora_linear_checked(x, x_a, W, A, B, m, bias, s, self.detach_norm)

    def _well_formed(self, x, W, A, B, m, bias):
        """A quick yes for the usual call (x and the parameters as the layer made them); for
        anything else the functional forms decide and say what is wrong."""
        out_features, in_features, r = self.out_features, self.in_features, self.r
        dtype, device = W.dtype, W.device
        return (isinstance(x, torch.Tensor) and x.layout == torch.strided
                and x.dtype == dtype and x.device == device
                and x.ndim >= 1 and x.size(-1) == in_features
                and W.shape == (out_features, in_features) and A.shape == (r, in_features)
                and B.shape == (out_features, r) and A.dtype == dtype and B.dtype == dtype
                and A.device == device and B.device == device
                and (m is None or (m.shape == (out_features,) and m.device == device))
                and (bias is None or (bias.shape == (out_features,) and bias.dtype == dtype
                                      and bias.device == device))
                and not (W.requires_grad and torch.is_grad_enabled())
                and (m is not None) == self.use_dora)

    def to_linear(self):
        """The same as to_base(): a plain nn.Linear holding W' and the bias."""
        return self.to_base()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, use_dora={self.use_dora}, merged={self.merged}")
