"""DoRALinear: an nn.Linear with a LoRA or DoRA adapter that drops into any model.

    y = (m / ‖W0 + s·B A‖_c) ⊙ (x W0^T + s·drop(x) A^T B^T) + b     use_dora=True
    y = x W0^T + s·drop(x) A^T B^T + b                               use_dora=False (LoRA)

Parameters are named as in PEFT: `weight` and `bias` (frozen, copied from the pretrained linear),
`lora_A` (r, in), `lora_B` (out, r) and `magnitude` (out,). Dropout acts on the adapter branch
only, so training costs no second base matmul and eval mode equals the merged layer (PEFT applies
the scale to a dropped-out base branch too when dropout > 0; both agree when dropout is 0).
"""

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_bool, check_dropout, check_positive, check_positive_int, check_rank
from .functional import (_divide_or_zero, accumulation_dtype, adapted_row_norm,
                         apply_dora_function, autocast_dtype, check_functional_arguments, dora_linear,
                         lora_forward, lora_linear, merged_weight, scale_outputs)


class DoRALinear(nn.Module):
    """A linear layer y = x W^T + b whose frozen weight is adapted by LoRA or DoRA.

    Args:
        in_features, out_features: as nn.Linear.
        r: rank of the update B A; lora_alpha: its scale numerator, scaling = lora_alpha / r.
        lora_dropout: dropout probability on the adapter branch's input.
        bias: whether the layer has a (frozen) bias.
        use_dora: DoRA (True) or plain LoRA (False).
        detach_norm: DoRA's backward treats ‖V'‖_c as a constant (Eq. 11, default) or not (Eq. 6).
    """

    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout=0.0, bias=True,
                 use_dora=True, detach_norm=True, device=None, dtype=None):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.r = check_rank(r)
        self.lora_alpha = check_positive("lora_alpha", lora_alpha)
        self.lora_dropout = check_dropout(lora_dropout)
        self.use_dora = check_bool("use_dora", use_dora)
        self.detach_norm = check_bool("detach_norm", detach_norm)
        check_bool("bias", bias)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.scaling = self.lora_alpha / self.r
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory),
                                   requires_grad=False)
        # register_parameter(name, None) keeps an absent bias or magnitude a known name, as in
        # nn.Linear
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory),
                                                     requires_grad=False) if bias else None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        # m is kept in float32 (float64 for a float64 layer): in bf16 a step of 1e-3 would vanish
        acc = accumulation_dtype(dtype or torch.get_default_dtype())
        self.register_parameter("magnitude", nn.Parameter(torch.empty(
            out_features, device=device, dtype=acc)) if use_dora else None)
        self.dropout = nn.Dropout(self.lora_dropout) if self.lora_dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_norm = None  # ‖V'‖_c at merge time, what unmerge() needs
        self._warned_merged_training = False
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear, r, lora_alpha, lora_dropout=0.0, use_dora=True,
                    detach_norm=True):
        """Wrap a pretrained nn.Linear: copies its weight and bias (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout,
                    bias=linear.bias is not None, use_dora=use_dora, detach_norm=detach_norm,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reset_adapter()
        return layer

    def reset_parameters(self):
        """Weight and bias as nn.Linear initializes them, then reset_adapter()."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    def reset_adapter(self):
        """A Kaiming-uniform (a = sqrt(5)), B = 0, m = ‖W0‖_c: the layer equals the base layer."""
        if self.merged:
            raise ValueError("reset_adapter(): the layer is merged; call unmerge() first")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self.reset_magnitude()

    def reset_magnitude(self):
        """m = ‖W0‖_c from the current weight (DoRA; LoRA has no magnitude): call it after loading
        pretrained weights into a layer that already has its adapter."""
        if self.merged:
            raise ValueError("reset_magnitude(): the layer is merged; call unmerge() first")
        if self.magnitude is not None:
            with torch.no_grad():  # ‖W0 + s·B A‖_c as forward computes it, with B = 0
                norm = adapted_row_norm(self.weight, self.lora_A, torch.zeros_like(self.lora_B),
                                        self.scaling)
                self.magnitude.copy_(norm)

    # --- no cache: every value derived from the parameters is computed when it is used --------

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .half(), to_empty(), ...: as nn.Module, except that the magnitude keeps
        its float32 (float64) dtype: it follows the layer's device, never its rounding."""
        magnitude = self._parameters.pop("magnitude")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["magnitude"] = magnitude
        if magnitude is not None:
            acc = accumulation_dtype(self.weight.dtype)
            moved = fn(magnitude.detach())  # what nn.Module would hold: device, maybe dtype
            if moved.dtype != acc:  # converted from the original, not from a rounded copy
                moved = (moved.to(acc) if magnitude.is_meta or moved.is_meta
                         else magnitude.detach().to(device=moved.device, dtype=acc))
            grad = magnitude.grad
            if torch._has_compatible_shallow_copy_type(magnitude, moved):  # as nn.Module does
                magnitude.data = moved
            else:  # e.g. to or from the meta device: a new Parameter
                magnitude = self._parameters["magnitude"] = nn.Parameter(
                    moved, magnitude.requires_grad)
            if grad is not None:
                magnitude.grad = grad.to(device=moved.device, dtype=acc)
        if self._merged_norm is not None:  # stays float64, follows the weight's device
            self._merged_norm = self._merged_norm.to(self.weight.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if (self.magnitude is not None and prefix + "weight" in state_dict
                and prefix + "magnitude" not in state_dict):
            warnings.warn(f"{type(self).__name__}: a new weight was loaded without a magnitude, "
                          "so the magnitude still holds ‖W0‖_c of the weight before; after "
                          "loading pretrained weights into an adapted model, call "
                          "dora_minimal.reset_magnitude(model) (or layer.reset_magnitude())",
                          stacklevel=3)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x):
        autocast = autocast_dtype(x) is not None
        if not autocast:  # (under autocast the functional forms below check, after casting)
            s = self.scaling if self._well_formed(x) else check_functional_arguments(
                x, self.weight, self.lora_A, self.lora_B, self.magnitude, self.bias, self.scaling,
                self.use_dora)
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self._warned_merged_training \
                    and any(p is not None and p.requires_grad for p in self._adapter()):
                self._warned_merged_training = True
                warnings.warn(f"{type(self).__name__}: the layer is merged, so its adapter "
                              "(lora_A, lora_B, magnitude) is not used and gets no gradient; "
                              "call unmerge() before training it", stacklevel=4)
            return F.linear(x, self.weight, self.bias)
        lora_input = self.dropout(x) if self.training and self.lora_dropout > 0 else None
        if autocast:  # they compute in autocast's dtype; m, the norms and c stay float32
            if not self.use_dora:
                return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling,
                                   self.bias, lora_input=lora_input)
            return dora_linear(x, self.weight, self.lora_A, self.lora_B, self.magnitude,
                               self.scaling, self.bias, self.detach_norm, lora_input=lora_input)
        if not self.use_dora:
            return lora_forward(x, self.weight, self.lora_A, self.lora_B, s, self.bias, lora_input)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in (self.lora_A, self.lora_B,
                                                             self.magnitude)))
        if self.training or needs_grad:  # checked above: straight to the autograd.Function
            return apply_dora_function(x, lora_input, self.weight, self.lora_A, self.lora_B,
                                       self.magnitude, self.bias, s, self.detach_norm)
        return self._inference(x)

    def _well_formed(self, x):
        """A quick yes for the usual call (x and the parameters as the layer made them); for
        anything else check_functional_arguments decides and says what is wrong."""
        W, A, B, m, bias = self.weight, self.lora_A, self.lora_B, self.magnitude, self.bias
        out_features, in_features, r = self.out_features, self.in_features, self.r
        return (isinstance(x, torch.Tensor) and x.dtype == W.dtype and x.device == W.device
                and x.ndim >= 1 and x.shape[-1] == in_features
                and W.shape == (out_features, in_features) and A.shape == (r, in_features)
                and B.shape == (out_features, r) and A.dtype == B.dtype == W.dtype
                and A.device == B.device == W.device
                and (m is None or (m.shape == (out_features,) and m.device == W.device))
                and (bias is None or (bias.shape == (out_features,) and bias.dtype == W.dtype
                                      and bias.device == W.device))
                and not (W.requires_grad and torch.is_grad_enabled())
                and isinstance(self.scaling, float) and 0 < self.scaling < math.inf
                and (m is not None) == self.use_dora)

    def _adapter(self):
        return self.lora_A, self.lora_B, self.magnitude

    def _inference(self, x):
        """Eval mode without gradients. With at least as many tokens as input features, forming
        W' = c ⊙ V' once (V' serving its own norm) is cheaper than scaling the (tokens, out)
        output; with fewer, scale the output."""
        if x.numel() // self.in_features >= self.in_features:
            W = merged_weight(self.weight, self.lora_A, self.lora_B, self.magnitude, self.scaling)
            return F.linear(x, W, self.bias)
        norm = adapted_row_norm(self.weight, self.lora_A, self.lora_B, self.scaling)  # (out,)
        y0 = lora_forward(x, self.weight, self.lora_A, self.lora_B, self.scaling)  # (..., out)
        return scale_outputs(y0, _divide_or_zero(self.magnitude.to(norm.dtype), norm), self.bias)

    # --- merge --------------------------------------------------------------------------------

    def _merge_math(self):
        """W' in float64 and ‖V'‖_c (DoRA) or None (LoRA): merge() checks them before writing."""
        W0, A, B = (t.detach().double() for t in (self.weight, self.lora_A, self.lora_B))
        V = torch.addmm(W0, B, A, alpha=self.scaling)  # (out, in): V' = W0 + s·B A
        if not self.use_dora:
            return V, None
        norm = torch.linalg.vector_norm(V, dim=1)  # (out,)
        m = self.magnitude.detach().double()
        return _divide_or_zero(m, norm)[:, None] * V, norm  # Eq. 5: W' = m · V'/‖V'‖_c

    def merge(self):
        """Write W' into `weight` (the layer then runs as a plain F.linear); unmerge() undoes it."""
        if self.merged:
            raise ValueError("merge(): the layer is already merged; call unmerge() first")
        W, norm = self._merge_math()
        if norm is not None:
            erased = torch.nonzero((self.magnitude == 0) & (norm > 0)).flatten().tolist()
            if erased:
                raise ValueError(f"merge(): rows {erased} have magnitude 0, so unmerge() could "
                                 f"not restore their W0; use to_linear() for a merged copy")
        self._write_weight("merge()", W, merged=True, merged_norm=norm)

    def unmerge(self):
        """Restore W0 = W' · ‖V'‖_c / m - s·B A from the norm stored by merge()."""
        if not self.merged:
            raise ValueError("unmerge(): the layer is not merged")
        W, A, B = (t.detach().double() for t in (self.weight, self.lora_A, self.lora_B))
        if self.use_dora:
            ratio = _divide_or_zero(self._merged_norm.to(W.device), self.magnitude.detach()
                                    .double())
            W = W * ratio[:, None]  # V' = W' · ‖V'‖_c / m
        W0 = torch.addmm(W, B, A, alpha=-self.scaling)  # W0 = V' - s·B A
        self._write_weight("unmerge()", W0, merged=False)

    def _write_weight(self, what, W, merged, merged_norm=None):
        """Write W into `weight` if it is finite in the layer's dtype, and record the state."""
        _check_finite(what, W, self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(W)
        self._merged_norm = merged_norm
        self.merged = merged

    def to_linear(self):
        """A plain nn.Linear holding the merged weight W' and the bias; this layer is unchanged."""
        W = self.weight.detach().double() if self.merged else self._merge_math()[0]
        _check_finite("to_linear()", W, self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(W)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)  # frozen stays frozen
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def get_extra_state(self):
        return {"merged": self.merged, "merged_norm": self._merged_norm}

    def set_extra_state(self, state):
        self.merged = bool(state["merged"])
        norm = state["merged_norm"]
        self._merged_norm = None if norm is None else norm.to(self.weight.device)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, use_dora={self.use_dora}, merged={self.merged}")


def _check_finite(what, W, dtype):
    """W must stay finite once rounded to the layer's dtype; the error names the bad rows."""
    rows = torch.nonzero(~torch.isfinite(W.to(dtype)).all(dim=1)).flatten().tolist()
    if rows:
        raise ValueError(f"{what}: the result would contain NaN or inf in rows {rows[:20]}"
                         f"{' ...' if len(rows) > 20 else ''}; the weights were left unchanged")
