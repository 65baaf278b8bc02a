"""AdaptedLayer: what every layer with a LoRA or DoRA adapter shares, whatever its base op.

Each kind (DoRALinear, DoRAConv1d/2d/3d, DoRAEmbedding, DoRAConv1D) adds only its base op and the
(out, in') view of its weights; DoRA itself is the same on every view:

    V' = W0 + s·B A          (out, in')      W' = (m / ‖V'‖_c) ⊙ V'      Eq. 5

Shared here: the parameters (`weight`, `bias` frozen; `lora_A`, `lora_B`, `magnitude` trained),
argument checks, reset, merge/unmerge, to_base() (the plain torch module holding W'), the merged
state saved as extra state, the magnitude kept in float32 by .to(), the warnings, the forward
(LoRA's output y0 from the layer's own ops under autograd, then dora_scale: dora_minimal.core)
and the mapping to PEFT's saved keys.
"""

import math
import warnings
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.utils import parametrize

from .cache import cached_scale_of, scale_output
from .checks import check_bool, check_dropout, check_positive, check_rank
from .core import accumulation_dtype, adapted_row_norm, divide_or_zero, row_blocks
from .functional import autocast_dtype, dora_scale


def _check_row_norms(owner, weight, norm):
    """Raise where ‖W0‖_c as forward computes it (squares summed in float32, or float64) is off
    by more than 0.1% from the row's norm computed with each row scaled by its largest entry:
    entries so small that their squares underflow, or so large that they overflow. Forward would
    take such a row for a zero row (c = 0), or give it c = 0 from an infinite norm, silently."""
    tiny, off = torch.finfo(norm.dtype).tiny, []
    for rows in row_blocks(*weight.shape):
        block = weight[rows].to(norm.dtype)  # (rows, in)
        scale = block.abs().amax(dim=1, keepdim=True).clamp_min(tiny)  # (rows, 1)
        true = torch.linalg.vector_norm(block / scale, dim=1) * scale[:, 0]  # (rows,)
        off += (torch.nonzero((norm[rows] - true).abs() > 1e-3 * true).flatten()
                + rows.start).tolist()
    if off:
        example = weight[off[0]].abs().amax().item()
        raise ValueError(
            f"{owner}: the norms of weight rows {off[:8]}{' ...' if len(off) > 8 else ''} "
            f"cannot be computed in {norm.dtype}: entries of size {example:.1e} have squares "
            f"that underflow or overflow, so DoRA would take these rows for zero rows or give "
            f"them an infinite norm. Rescale those rows, or use the layer in float64 "
            f"(.double())")


class AdaptedLayer(nn.Module):
    """The base of every adapted layer. A subclass sets its dimensions, calls
    _create_parameters(...), and defines:

        BASE_TYPES          the plain torch classes it adapts (or a predicate on a module)
        _weight_view(W)     the (out, in') view of a weight in the layer's layout, and
        _from_view(V)       its inverse (defaults: W itself, or W^T when the weight is stored
                            (in', out): WEIGHT_STORED_TRANSPOSED)
        _lora_views()       the (r, in') and (out, r) views of lora_A and lora_B (default: both)
        _base_op(x, W, b)   the layer's own op with weight W and bias b (or None)
        _lora_op(x)         s·B(A(x)), the scaling on B (the small factor)
        _check_input(x)     a clear error for an input of the wrong dtype or size
        _plain_module()     an empty plain torch module of the base's kind and settings
        _init_base()        the base's own weight init
    """
    BASE_TYPES = ()
    TRAILING_DIMS = 0  # dims of the output after its channel dim (a convolution's spatial dims)
    FAN_IN_FAN_OUT = False  # PEFT's config flag for a weight stored (in, out)
    WEIGHT_STORED_TRANSPOSED = False  # an embedding's table and GPT-2's Conv1D are (in', out)
    PEFT_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                 "magnitude": "lora_magnitude_vector"}
    _adapter_off = 0  # how many disable_adapter blocks hold this layer (dora_minimal.disable)
    _scale_cache = None  # inside dora_minimal.cached_scale: the layer's ScaleCache

    def __init__(self, r, lora_alpha, lora_dropout, use_dora, detach_norm, bias, dtype):
        super().__init__()
        self._r = check_rank(r)
        self.lora_alpha = lora_alpha
        self._lora_dropout = check_dropout(lora_dropout)
        self._use_dora = check_bool("use_dora", use_dora)
        self.detach_norm = detach_norm
        check_bool("bias", bias)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")

    # --- r (fixed), lora_alpha, scaling and lora_dropout: one source each, checked when set -----

    @property
    def r(self):
        """The rank: lora_A has r rows and lora_B r columns, so it is fixed once built."""
        return self._r

    @r.setter
    def r(self, value):
        raise AttributeError(f"r: is fixed when the layer is built (lora_A is ({self._r}, in), "
                             f"lora_B (out, {self._r}) and scaling = lora_alpha / r), got "
                             f"r = {value!r}; build a new layer for another rank, or set "
                             f"lora_alpha (or scaling) to change the scaling")

    @property
    def use_dora(self):
        """DoRA (a magnitude) or LoRA (none): fixed when the layer is built."""
        return self._use_dora

    @use_dora.setter
    def use_dora(self, value):
        raise AttributeError(f"use_dora: is fixed when the layer is built (a DoRA layer has a "
                             f"magnitude, a LoRA layer none), got use_dora = {value!r}; build a "
                             f"new layer (from_base, or inject_adapters with LoraConfig)")

    @property
    def detach_norm(self):
        """DoRA's backward: ‖V'‖_c a constant (True, Eq. 11) or differentiated (False, Eq. 6)."""
        return self._detach_norm

    @detach_norm.setter
    def detach_norm(self, value):
        self._detach_norm = check_bool("detach_norm", value)

    @property
    def lora_alpha(self):
        return self._lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value):
        self._lora_alpha = check_positive("lora_alpha", value)

    @property
    def scaling(self):
        """s = lora_alpha / r; setting it sets lora_alpha = s·r, which is what is saved."""
        return self._lora_alpha / self.r

    @scaling.setter
    def scaling(self, value):
        self._lora_alpha = check_positive("scaling", value) * self.r

    @property
    def lora_dropout(self):
        return self._lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, p):
        self._lora_dropout = check_dropout(p)
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()

    def _create_parameters(self, weight_shape, lora_A_shape, lora_B_shape, out, bias, device,
                           dtype):
        """Register weight, bias (frozen), lora_A, lora_B and the magnitude (out,), then reset."""
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory), requires_grad=False)
        # register_parameter(name, None) keeps an absent bias or magnitude a known name, as in
        # nn.Linear
        self.register_parameter("bias", nn.Parameter(torch.empty(out, **factory),
                                                     requires_grad=False) if bias else None)
        self.lora_A = nn.Parameter(torch.empty(lora_A_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(lora_B_shape, **factory))
        # m is kept in float32 (float64 for a float64 layer): in bf16 a step of 1e-3 would vanish
        acc = accumulation_dtype(dtype or torch.get_default_dtype())
        self.register_parameter("magnitude", nn.Parameter(torch.empty(
            out, device=device, dtype=acc)) if self.use_dora else None)
        self.lora_dropout = self._lora_dropout  # (makes the dropout module)
        self.merged = False
        self._merged_adapter = None  # (A, B, m, s) at merge time: unmerge() needs them unchanged
        self._merged_norm = None  # ‖V'‖_c at merge time, what unmerge() needs
        self._warned_merged_training = False
        self.reset_parameters()

    # --- which modules, and the conversions both ways -----------------------------------------

    @classmethod
    def adapts(cls, module):
        """Whether `module` is a plain layer this class adapts."""
        if callable(cls.BASE_TYPES) and not isinstance(cls.BASE_TYPES, tuple):
            return bool(cls.BASE_TYPES(module))
        return type(module) in cls.BASE_TYPES  # not subclasses: they may change the op

    @classmethod
    def from_base(cls, module, r, lora_alpha, lora_dropout=0.0, use_dora=True, detach_norm=True):
        """Wrap a pretrained plain layer: copies its weight and bias (same device and dtype)."""
        if not cls.adapts(module):
            raise TypeError(f"module: {cls.__name__} adapts {cls._base_names()}, "
                            f"got {type(module).__name__}")
        return cls._wrap(module, r, lora_alpha, lora_dropout, use_dora, detach_norm)

    @classmethod
    def _wrap(cls, module, r, lora_alpha, lora_dropout, use_dora, detach_norm):
        layer = cls._like(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          use_dora=use_dora, detach_norm=detach_norm,
                          device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if getattr(module, "bias", None) is not None:
                layer.bias.copy_(module.bias)
        layer.reset_adapter()
        return layer.train(module.training)  # in the mode of the module it replaces

    @classmethod
    def _base_names(cls):
        if isinstance(cls.BASE_TYPES, tuple):
            return " or ".join(f"torch.nn.{t.__name__}" for t in cls.BASE_TYPES)
        return cls.BASE_TYPES.__doc__.strip().splitlines()[0]

    def to_base(self):
        """A plain torch module of the base's kind holding the merged weight W' and the bias;
        this layer is unchanged."""
        W = self.weight.detach().double() if self.merged else self._from_view(self._merge_math()[0])
        _check_finite(self._to_plain_name, self._weight_view(W), self.weight.dtype)
        module = self._plain_module()
        with torch.no_grad():
            module.weight.copy_(W)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        module.weight.requires_grad_(self.weight.requires_grad)  # frozen stays frozen
        if self.bias is not None:
            module.bias.requires_grad_(self.bias.requires_grad)
        return module

    def peft_tensors(self):
        """{PEFT's key suffix: tensor in PEFT's shape}, as PEFT 0.21.2 saves this layer's adapter
        (the keys follow `base_model.model.<path>.`); detached views of the parameters."""
        tensors = {self.PEFT_KEYS[name]: getattr(self, name).detach()
                   for name in ("lora_A", "lora_B", "magnitude") if getattr(self, name) is not None}
        if self.magnitude is not None:  # a convolution's (1, out, 1, ...)
            key = self.PEFT_KEYS["magnitude"]
            tensors[key] = self._peft_magnitude_shape(tensors[key])
        return tensors

    def _peft_magnitude_shape(self, magnitude):
        return magnitude

    def load_peft_tensors(self, tensors):
        """Load what peft_tensors() gives (PEFT's key suffixes and shapes). Keys and shapes must
        match exactly; on a mismatch ValueError says which and the layer is unchanged."""
        targets = self.peft_tensors()
        if not isinstance(tensors, dict):
            raise TypeError(f"tensors: expected a dict of tensors, got {type(tensors).__name__}")
        if set(tensors) != set(targets):
            raise ValueError(f"tensors: expected the keys {sorted(targets)}, "
                             f"got {sorted(tensors)}")
        for key, target in targets.items():
            value = tensors[key]
            if not (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
                raise TypeError(f"tensors: {key} expected a floating tensor, got {value!r:.60}")
            if value.shape != target.shape:
                raise ValueError(f"tensors: {key} expected shape {tuple(target.shape)}, "
                                 f"got {tuple(value.shape)}")
        if self.merged:
            raise ValueError("load_peft_tensors(): the layer is merged; call unmerge() first")
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(tensors[key])  # a view: writes into the parameter
        return self

    # --- the (out, in') views ------------------------------------------------------------------

    def _weight_view(self, W):
        return W.T if self.WEIGHT_STORED_TRANSPOSED else W

    def _from_view(self, V):
        return V.T if self.WEIGHT_STORED_TRANSPOSED else V

    def _lora_views(self):
        return self.lora_A, self.lora_B

    # --- init ---------------------------------------------------------------------------------

    def reset_parameters(self):
        """Weight and bias as the base layer initializes them, then reset_adapter()."""
        with torch.no_grad():
            self._init_base()
        self.reset_adapter()

    def reset_adapter(self):
        """A Kaiming-uniform (a = sqrt(5)), B = 0, m = ‖W0‖_c: the layer equals the base layer."""
        if self.merged:
            raise ValueError("reset_adapter(): the layer is merged; call unmerge() first")
        norm = self._weight_norm()  # (checked before anything changes)
        with torch.no_grad():
            self._init_adapter()
            if norm is not None:
                self.magnitude.copy_(norm)

    def _init_adapter(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reset_magnitude(self):
        """m = ‖W0‖_c from the current weight (DoRA; LoRA has no magnitude): call it after loading
        pretrained weights into a layer that already has its adapter."""
        if self.merged:
            raise ValueError("reset_magnitude(): the layer is merged; call unmerge() first")
        norm = self._weight_norm()
        if norm is not None:
            with torch.no_grad():
                self.magnitude.copy_(norm)

    def _weight_norm(self):
        """‖W0‖_c (out,) as forward computes it (‖W0 + s·B A‖_c with B = 0), None for LoRA;
        a ValueError where forward cannot compute it (_check_row_norms)."""
        if self.magnitude is None:
            return None
        device = self.weight.device.type
        # (autocast off: it would compute the norm in bf16; no_grad: nothing to record)
        with torch.no_grad(), torch.autocast(device, enabled=False) if \
                torch.amp.is_autocast_available(device) else nullcontext():
            A, B = self._lora_views()  # (zeros like them: A may not be initialized yet)
            weight = self._weight_view(self.weight)
            norm = adapted_row_norm(weight, torch.zeros_like(A), torch.zeros_like(B),
                                    self.scaling)
            if not norm.is_meta:
                _check_row_norms(type(self).__name__, weight, norm)
        return norm

    # --- .to() and loading: nothing derived from the parameters is kept but cached_scale's c ---

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .half(), to_empty(), ...: as nn.Module, except that the magnitude keeps
        its float32 (float64) dtype: it follows the layer's device, never its rounding. (The one
        override of a private nn.Module method here; torch's own RNN modules override it too.)"""
        magnitude = self.magnitude
        before = None if magnitude is None else (  # the float32 values (.data is swapped)
            magnitude.detach(), None if magnitude.grad is None else magnitude.grad.detach())
        super()._apply(fn, recurse)
        magnitude, acc = self.magnitude, accumulation_dtype(self.weight.dtype)
        if magnitude is not None and magnitude.dtype != acc:
            # converted from the values before, not from a rounded copy (none on meta)
            for name, old in zip(("data", "grad"), before):
                new = getattr(magnitude, name)
                if new is not None:
                    source = new if old is None or old.is_meta or new.is_meta else old
                    setattr(magnitude, name, source.to(device=new.device, dtype=acc))
        if self._merged_norm is not None:  # stays float64, follows the weight's device
            self._merged_norm = self._merged_norm.to(self.weight.device)
        if self._scale_cache is not None:  # (a storage freed here may be reused)
            self._scale_cache.clear()
        return self

    # --- loading: all or nothing, per layer --------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """load_state_dict, all or nothing for this layer: the keys of it that the state dict
        holds are checked before anything is written (each tensor's type and shape as torch
        checks them, the extra state, a weight and a merged flag that belong together), and if
        one fails the layer keeps every tensor and flag as it was. A bad extra state or flag
        raises ValueError at once; a bad tensor is torch's error, raised by load_state_dict once
        it has walked the whole model. (torch passes strict=True to every module and decides at
        the end: keys missing from the state dict are not loaded, the others are, in every
        module, before strict's error.)"""
        own = dict(self.named_parameters(recurse=False))  # (None entries are not listed)
        problems = self._load_problems(state_dict, prefix, own, local_metadata)
        if problems:
            error_msgs.extend(problems)
            missing_keys.extend(prefix + name for name in own if prefix + name not in state_dict)
            return
        merged_state = self._merged_state_to_load(state_dict, prefix)  # ValueError: unchanged
        if (self.magnitude is not None and prefix + "weight" in state_dict
                and prefix + "magnitude" not in state_dict):
            warnings.warn(f"{type(self).__name__}: a new weight was loaded without a magnitude, "
                          "so the magnitude still holds ‖W0‖_c of the weight before; after "
                          "loading pretrained weights into an adapted model, call "
                          "dora_minimal.reset_magnitude(model) (or layer.reset_magnitude())",
                          stacklevel=3)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "_extra_state" in missing_keys:  # a state dict without it: not merged
            missing_keys.remove(prefix + "_extra_state")
        self.merged, self._merged_norm, self._merged_adapter = merged_state
        if self._scale_cache is not None:  # (lets go of parameters replaced by assign=True)
            self._scale_cache.clear()
        if self._merged_norm is not None:
            self._merged_norm = self._merged_norm.to(self.weight.device)
        magnitude, acc = self.magnitude, accumulation_dtype(self.weight.dtype)
        if magnitude is not None and magnitude.dtype != acc:  # assign=True took a bf16 one
            magnitude.data = magnitude.data.to(acc)

    def _load_problems(self, state_dict, prefix, own, local_metadata):
        """What torch's loading would fail on after writing other tensors: a value that is not a
        tensor, a shape mismatch, a sparse or a meta tensor copied into real storage."""
        assign = local_metadata.get("assign_to_params_buffers", False)
        problems = []
        for name, current in own.items():
            if prefix + name not in state_dict:
                continue
            key, value = prefix + name, state_dict[prefix + name]
            if not torch.overrides.is_tensor_like(value):
                problems.append(f"{key}: expected a tensor, got {type(value).__name__}")
            elif value.shape != current.shape:
                problems.append(f"size mismatch for {key}: copying a param with shape "
                                f"{tuple(value.shape)} from checkpoint, the shape in current "
                                f"model is {tuple(current.shape)}.")
            elif value.layout != torch.strided:
                problems.append(f"{key}: expected a dense tensor, got {value.layout}")
            elif value.is_meta and not current.is_meta and not assign:
                problems.append(f"{key}: a meta tensor holds no values to copy; load it with "
                                f"assign=True, or load real tensors")
        if problems:
            where = f" at {prefix[:-1]!r}" if prefix else ""
            problems[-1] += (f" ({type(self).__name__}{where}: none of its tensors was loaded, "
                             f"it is as it was)")
        return problems

    def _merged_state_to_load(self, state_dict, prefix):
        """(merged, ‖V'‖_c or None, the merge snapshot) that loading `state_dict` leaves: that of
        its extra state, or unmerged without one; a ValueError, nothing changed, where the state
        dict would leave a weight and a merged flag that do not belong together."""
        key = prefix + "_extra_state"
        merged, norm = (self._parse_extra_state(state_dict[key]) if key in state_dict
                        else (False, None))
        name = type(self).__name__
        if prefix + "weight" in state_dict:
            absent = [n for n in ("lora_A", "lora_B", "magnitude")
                      if getattr(self, n) is not None and prefix + n not in state_dict]
            if merged and absent:
                raise ValueError(f"{name}: a merged state (_extra_state [1, ...]) needs the "
                                 f"adapter it was merged with, to unmerge; the state dict has "
                                 f"the merged weight but not {[prefix + n for n in absent]}")
            return merged, norm, None
        # no weight: the layer keeps its own, and so must keep the state it is in
        same = merged == self.merged and (norm is None) == (self._merged_norm is None) and (
            norm is None or torch.equal(norm.to(self._merged_norm), self._merged_norm))
        if not same:
            held = "its merged weight W′" if self.merged else "its weight W0 (unmerged)"
            says = ("other norms ‖V′‖_c" if merged == self.merged else
                    "a merged state" if merged else "an unmerged state (no _extra_state, or [0])")
            raise ValueError(f"{name}: the state dict has no {prefix}weight, so the layer would "
                             f"keep {held}, but it holds {says}: load the weight that belongs "
                             f"to that state with it, or {'unmerge' if self.merged else 'merge'}"
                             f"() first; nothing was loaded")
        return self.merged, self._merged_norm, self._merged_adapter

    # --- forward (DoRALinear has its own, fused) ----------------------------------------------

    def _warn_if_training_merged(self):
        if self.training and torch.is_grad_enabled() and not self._warned_merged_training \
                and any(p is not None and p.requires_grad for p in self._adapter()):
            self._warned_merged_training = True
            warnings.warn(f"{type(self).__name__}: the layer is merged, so its adapter "
                          "(lora_A, lora_B, magnitude) is not used and gets no gradient; "
                          "call unmerge() before training it", stacklevel=5)

    def _adapter(self):
        return self.lora_A, self.lora_B, self.magnitude

    def _adapter_input(self, x):
        return self.dropout(x) if self.training and self.lora_dropout > 0 else x

    def forward(self, x):
        """y = c ⊙ (base(x; W0) + s·B(A(drop(x)))) + b with c = m / ‖V'‖_c (DoRA), or the
        LoRA output base(x; W0) + s·B(A(drop(x))) + b. Merged: base(x; W') + b."""
        self._check_input(x)
        if self._adapter_off:
            return self._base_forward(x)
        if self.merged:
            self._warn_if_training_merged()
            return self._base_op(x, self.weight, self.bias)
        lora = self._lora_op(self._adapter_input(x))  # s·B(A(drop(x)))
        if not self.use_dora:  # LoRA: y = base(x; W0) + b + s·B(A(drop(x)))
            return self._base_op(x, self.weight, self.bias) + lora
        y0 = self._base_op(x, self.weight, None) + lora
        if self._scale_cache is not None:  # inside cached_scale: c from the cache, if it serves
            c = cached_scale_of(self, self.weight, self.lora_A, self.lora_B, self.magnitude)
            if c is not None:
                return scale_output(y0, c, self.bias, self.TRAILING_DIMS)
        A, B = self._lora_views()
        return dora_scale(y0, self._weight_view(self.weight), A, B, self.magnitude, self.scaling,
                          self.bias, self.detach_norm, self.TRAILING_DIMS)

    def _base_forward(self, x):
        """The base layer's own output base(x; W0) + b, the adapter left out: inside
        dora_minimal.disable_adapter (which refuses merged layers; this is the last guard)."""
        if self.merged:
            raise ValueError(f"{type(self).__name__}: the layer is merged, so its weight holds "
                             f"W′ and not the base's W0: unmerge() it to switch its adapter off")
        return self._base_op(x, self.weight, self.bias)

    def _check_input(self, x):
        """x: a dense tensor of the layer's dtype (any floating dtype under autocast) and input
        size; a TypeError or ValueError naming the layer, what it expected and what it got,
        before anything is computed."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
            raise TypeError(f"x: {name} expected a dense torch.Tensor, got "
                            f"{getattr(x, 'layout', type(x).__name__)}")
        if x.dtype != self.weight.dtype and not (x.is_floating_point()
                                                 and autocast_dtype(x) is not None):
            raise TypeError(f"x: {name} expected dtype {self.weight.dtype} (its weight's), got "
                            f"{x.dtype}; convert the input or the layer (.to(dtype))")
        self._check_input_size(x, name)

    def _check_input_size(self, x, name):
        """A linear layer's: (..., in_features)."""
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: {name} expected a last dimension of {self.in_features} (its "
                             f"in_features), got shape {tuple(x.shape)}")

    # --- merge --------------------------------------------------------------------------------

    def _merge_math(self):
        """W' (out, in') in float64 and ‖V'‖_c (DoRA) or None (LoRA): merge() checks them
        before writing."""
        W0 = self._weight_view(self.weight.detach().double())
        A, B = (t.detach().double() for t in self._lora_views())
        V = torch.addmm(W0, B, A, alpha=self.scaling)  # (out, in'): V' = W0 + s·B A
        if not self.use_dora:
            return V, None
        norm = torch.linalg.vector_norm(V, dim=1)  # (out,)
        m = self.magnitude.detach().double()
        return divide_or_zero(m, norm)[:, None] * V, norm  # Eq. 5: W' = m · V'/‖V'‖_c

    def merge(self):
        """Write W' into `weight` (the layer then runs as its plain base op); unmerge() undoes
        it."""
        if self.merged:
            raise ValueError("merge(): the layer is already merged; call unmerge() first")
        if self._adapter_off:
            raise ValueError("merge(): the adapter is switched off (inside disable_adapter); "
                             "merge after the block")
        if parametrize.is_parametrized(self, "weight"):
            raise ValueError(f"merge(): the weight is parametrized (torch.nn.utils.parametrize), "
                             f"so W' cannot be written into it; use {self._to_plain_name} for "
                             f"a merged copy")
        W, norm = self._merge_math()
        if norm is not None:
            erased = torch.nonzero((self.magnitude == 0) & (norm > 0)).flatten().tolist()
            if erased:
                raise ValueError(f"merge(): rows {erased} have magnitude 0, so unmerge() could "
                                 f"not restore their W0; use {self._to_plain_name} for a merged "
                                 f"copy")
        self._write_weight("merge()", W, merged=True, merged_norm=norm)
        self._merged_adapter = self._adapter_snapshot()

    def _adapter_snapshot(self):
        return [p.detach().clone() for p in self._adapter() if p is not None] + [self.scaling]

    _to_plain_name = "to_base()"

    def unmerge(self):
        """Restore W0 = W' · ‖V'‖_c / m - s·B A from the norm stored by merge()."""
        if not self.merged:
            raise ValueError("unmerge(): the layer is not merged")
        snapshot = self._merged_adapter
        if snapshot is not None and not all(
                torch.equal(a.to(device=b.device, dtype=b.dtype), b)
                if isinstance(a, torch.Tensor) else a == b
                for a, b in zip(snapshot, self._adapter_snapshot())):
            raise ValueError("unmerge(): lora_A, lora_B, magnitude or scaling changed since "
                             "merge(), so W0 cannot be recovered from the merged weight; put "
                             "them back as they were at merge() first")
        W = self._weight_view(self.weight.detach().double())
        A, B = (t.detach().double() for t in self._lora_views())
        if self.use_dora:
            ratio = divide_or_zero(self._merged_norm.to(W.device), self.magnitude.detach()
                                    .double())
            W = W * ratio[:, None]  # V' = W' · ‖V'‖_c / m
        W0 = torch.addmm(W, B, A, alpha=-self.scaling)  # W0 = V' - s·B A
        self._write_weight("unmerge()", W0, merged=False)
        self._merged_adapter = None

    def _write_weight(self, what, W, merged, merged_norm=None):
        """Write W (out, in') into `weight` if it is finite in the layer's dtype, and record the
        state."""
        _check_finite(what, W, self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(self._from_view(W))
        self._merged_norm = merged_norm
        self.merged = merged

    def get_extra_state(self):
        """The merged state as one float64 tensor, so that a state dict holds tensors only (as
        safetensors and transformers' save_pretrained need): [0] unmerged, [1] merged (LoRA),
        [1, ‖V'‖_c...] merged (DoRA: the norms unmerge() needs)."""
        flag = torch.tensor([float(self.merged)], dtype=torch.float64, device=self.weight.device)
        if self._merged_norm is None:
            return flag
        return torch.cat([flag, self._merged_norm.to(flag.device)])  # (1 + out,)

    def set_extra_state(self, state):
        """The merged state from get_extra_state()'s tensor (or an earlier version's dict); a
        ValueError, the layer unchanged, for anything else."""
        merged, norm = self._parse_extra_state(state)
        self._merged_adapter = None  # (what a merged state was merged with is not saved)
        self.merged = merged
        self._merged_norm = None if norm is None else norm.to(self.weight.device)

    def _parse_extra_state(self, state):
        """(merged, ‖V'‖_c (out,) float64 or None) from a saved extra state, checked: a merged
        DoRA state needs its `out` norms, finite and >= 0, since unmerge() divides by them."""
        name, out = type(self).__name__, self._weight_view(self.weight).shape[0]
        if isinstance(state, dict):  # as saved by earlier versions
            merged, norm = state.get("merged"), state.get("merged_norm")
            wants_norm = merged is True and self.use_dora
            if (set(state) != {"merged", "merged_norm"} or not isinstance(merged, bool)
                    or (norm is not None) != wants_norm
                    or (wants_norm and not (isinstance(norm, torch.Tensor)
                                            and norm.shape == (out,)))):
                wanted = (f"a tensor of the {out} norms ‖V′‖_c if merged, else None"
                          if self.use_dora else "None")
                raise ValueError(f"{name}: _extra_state as a dict expected {{'merged': True or "
                                 f"False, 'merged_norm': {wanted}}}, got {_short(state)}")
            norm = None if norm is None else norm.double()
        else:
            flag = (state[0].item() if isinstance(state, torch.Tensor) and state.dim() == 1
                    and len(state) > 0 and not state.is_meta else None)
            merged = flag == 1
            length = 1 + out if merged and self.use_dora else 1
            if flag not in (0, 1) or len(state) != length:
                raise ValueError(f"{name}: _extra_state expected a tensor [0] "
                                 f"(unmerged) or [1{', ‖V′‖_c...' if self.use_dora else ''}] "
                                 f"(merged, {length} values), got {_short(state)}")
            norm = state[1:].double() if merged and self.use_dora else None
        if norm is not None and not bool(torch.isfinite(norm).all() and (norm >= 0).all()):
            raise ValueError(f"{name}: _extra_state: the norms ‖V′‖_c of a merged state must be "
                             f"finite and >= 0, got {_short(norm)}")
        return merged, norm


def _short(value):
    return f"{value!r:.80}"


def _check_finite(what, W, dtype):
    """W (out, in') must stay finite once rounded to the layer's dtype; the error names the bad
    rows."""
    rows = torch.nonzero(~torch.isfinite(W.to(dtype)).all(dim=1)).flatten().tolist()
    if rows:
        raise ValueError(f"{what}: the result would contain NaN or inf in rows {rows[:20]}"
                         f"{' ...' if len(rows) > 20 else ''}; the weights were left unchanged")
