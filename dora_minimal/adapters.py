"""Adapters in whole models: one config flag for LoRA or DoRA, inject, merge, count.

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "fc2"], use_dora=True)
    model = get_peft_model(model, config)        # nn.Linear -> DoRALinear, the rest frozen
    ...train...
    model = merge_and_unload(model)              # DoRALinear -> nn.Linear holding W'

The names follow Hugging Face PEFT (LoraConfig's fields and defaults, get_peft_model,
merge_and_unload, print_trainable_parameters) without depending on it; saving.py writes and
reads PEFT's saved-adapter files. ADAPTER_KINDS below is the one place that says which modules
can be adapted, by which adapter layer, and under which PEFT keys its tensors are saved.
"""

import re
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .checks import (check_bool, check_dropout, check_positive, check_positive_int,
                     check_rank)
from .conv import DoRAConv1d, DoRAConv2d, DoRAConv3d
from .embedding import DoRAEmbedding
from .gpt2_conv1d import DoRAConv1D
from .layer import DoRALinear


class AdapterKind(NamedTuple):
    """Which adapter layer adapts which base modules. The layer class (an AdaptedLayer) knows the
    rest: adapts(module), from_base(...), to_base(), peft_tensors() (its tensors under PEFT's
    keys and shapes) and FAN_IN_FAN_OUT (PEFT's flag for a weight stored (in, out))."""
    adapter: type
    linear: bool  # chosen by target_modules=None and "all-linear"


# the one list of what can be adapted; a new layer type is one more entry here
ADAPTER_KINDS = (
    AdapterKind(DoRALinear, linear=True),  # nn.Linear
    AdapterKind(DoRAConv1D, linear=True),  # transformers' Conv1D (GPT-2): a linear layer
    AdapterKind(DoRAConv1d, linear=False),
    AdapterKind(DoRAConv2d, linear=False),
    AdapterKind(DoRAConv3d, linear=False),
    AdapterKind(DoRAEmbedding, linear=False),
)
ALL_LINEAR = "all-linear"
# PEFT's task types (peft.TaskType); None: no task head
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
# the heads PEFT (0.22) adds to modules_to_save for a task_type: trained in full, never adapted,
# each only where the model has it (DistilBERT's pre_classifier is a new, random layer too)
_CLASSIFIER_HEADS = ("classifier", "score", "pre_classifier")
TASK_HEADS = {"SEQ_CLS": _CLASSIFIER_HEADS, "TOKEN_CLS": _CLASSIFIER_HEADS,
              "QUESTION_ANS": ("qa_outputs",)}
# a module trained in full (modules_to_save) carries this attribute: the config's task_type
TRAINED_IN_FULL = "_dora_minimal_modules_to_save"
# an adapted model carries this attribute: what save_pretrained writes beside the layers
# ({"task_type", "base_model_name_or_path", "revision"}, PEFT's config fields)
ADAPTED_MODEL = "_dora_minimal_adapted"

# target_modules=None on a transformers model: what PEFT 0.21.2 adapts for its config.model_type
# (facts of PEFT's per-model LoRA defaults). A type not listed here has no default there either.
_Q_V = ("q_proj", "v_proj")
DEFAULT_TARGET_MODULES = {
    **dict.fromkeys(("llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                     "gemma2", "gemma3_text", "stablelm", "opt", "bart", "gptj", "gpt_neo"),
                    _Q_V),
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "layoutlm"),
                    ("query", "value")),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),
    **dict.fromkeys(("gpt_neox", "bloom", "falcon", "chatglm", "RefinedWeb", "RefinedWebModel"),
                    ("query_key_value",)),
    "phi": _Q_V + ("fc1", "fc2"), "btlm": ("c_proj", "c_attn"), "codegen": ("qkv_proj",),
    "mpt": ("Wqkv",), "deberta": ("in_proj",), "deberta-v2": ("query_proj", "value_proj"),
    "blip-2": ("q", "v") + _Q_V, "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}
# PEFT's init_lora_weights values that rewrite the base weight when the adapter is created
# (W0 becomes W0 - s·B A): such an adapter only fits the base weights PEFT rewrote
REWRITES_BASE_WEIGHT = ("pissa", "olora", "corda", "loftq", "lora_ga")
# values that only initialize A and B (the base is untouched): a saved adapter of these loads
INIT_ONLY = (True, False, "gaussian", "eva", "orthogonal")


def kind_of(module):
    """The AdapterKind that adapts `module` (a base module) or that `module` is (an adapter)."""
    for kind in ADAPTER_KINDS:  # (DoRALinear.adapts refuses nn.MultiheadAttention's out_proj)
        if isinstance(module, kind.adapter) or kind.adapter.adapts(module):
            return kind
    return None


@dataclass(frozen=True)
class LoraConfig:
    """Which layers get an adapter, and which adapter: PEFT's field names and defaults.

    r: rank; lora_alpha: scaling = lora_alpha / r; lora_dropout: on the adapter branch's input;
    target_modules: a list of names, each matching a module's whole dotted name or its end
    ("fc1" matches "encoder.0.fc1"); a string, a regular expression matched against the whole
    name (re.fullmatch); "all-linear": every nn.Linear but a model's output embedding (what
    its get_output_embeddings() returns, as in PEFT); None: for a transformers model what PEFT
    adapts for its model type (DEFAULT_TARGET_MODULES), for any other model every nn.Linear
    (and transformers' Conv1D) whose weight is not tied to another module's. Named targets may
    also be nn.Conv1d/2d/3d and nn.Embedding layers.
    use_dora: DoRA or plain LoRA; detach_norm (ours, not PEFT's): DoRA's backward treats ‖V'‖_c
    as a constant (Eq. 11, True) or differentiates it (Eq. 6, False).
    rank_pattern / alpha_pattern: {regex: r or lora_alpha} for some layers, PEFT's rule: the
    first key K that matches the end of a layer's name (re.match(rf"(.*\\.)?({K})$", name)).
    modules_to_save: names of modules trained in full (their own weights, no adapter) and saved
    with the adapter, as in PEFT; task_type "SEQ_CLS" or "TOKEN_CLS" adds "classifier",
    "score" and "pre_classifier", "QUESTION_ANS" adds "qa_outputs", as PEFT 0.22 does (those
    may be absent from the model; a name of the user's own that matches no module is a
    ValueError). A module to save, and anything inside it, is never adapted. task_type is
    one of PEFT's task types (TASK_TYPES) or None; it, base_model_name_or_path and revision
    are written to adapter_config.json, where PEFT's AutoPeftModel classes read them.
    bias is accepted (the bias stays frozen).
    inference_mode=True freezes the adapters too, as in PEFT; init_lora_weights must be True
    (PEFT's default init); fan_in_fan_out is accepted, but the layout follows each layer's type
    (transformers' Conv1D stores (in, out)), which is what PEFT ends up with too.
    """
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[str, Sequence[str]]] = None
    use_dora: bool = False
    detach_norm: bool = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    bias: str = "none"
    task_type: Optional[str] = None
    inference_mode: bool = False
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False
    modules_to_save: Optional[Sequence[str]] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None

    def __post_init__(self):
        check_rank(self.r)
        check_positive("lora_alpha", self.lora_alpha)
        check_dropout(self.lora_dropout)
        check_bool("use_dora", self.use_dora)
        check_bool("detach_norm", self.detach_norm)
        check_bool("inference_mode", self.inference_mode)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_init_lora_weights("init_lora_weights", self.init_lora_weights)
        if self.init_lora_weights is not True:
            raise ValueError(f"init_lora_weights: only True (PEFT's default init: A Kaiming-"
                             f"uniform, B = 0) is supported, got {self.init_lora_weights!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type: expected one of PEFT's task types {list(TASK_TYPES)} "
                             f"or None, got {self.task_type!r}")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}: expected a str or None, got {getattr(self, name)!r}")
        saved = self.modules_to_save
        if saved is not None and (isinstance(saved, str) or not all(
                isinstance(name, str) and name for name in saved)):
            raise TypeError(f"modules_to_save: expected a list of module names, got {saved!r}")
        heads = TASK_HEADS.get(self.task_type, ())
        if saved is not None or heads:
            names = list(saved or ())
            object.__setattr__(self, "modules_to_save",
                               tuple(names + [h for h in heads if h not in names]))
        if self.bias != "none":
            raise ValueError(f"bias: only 'none' is supported (the bias stays frozen), "
                             f"got {self.bias!r}")
        for name, pattern, check in [("rank_pattern", self.rank_pattern, check_positive_int),
                                     ("alpha_pattern", self.alpha_pattern, check_positive)]:
            if not isinstance(pattern, dict):
                raise TypeError(f"{name}: expected a dict {{regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                _check_regex(f"{name} key", key)
                check(f"{name}[{key!r}]", value)
        targets = self.target_modules
        if targets is None:
            return
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                object.__setattr__(self, "target_modules", ALL_LINEAR)
                return
            _check_regex("target_modules", targets)
            return
        if not isinstance(targets, (list, tuple, set, frozenset)):
            raise TypeError(f"target_modules: expected a list of module names, a regular "
                            f"expression, 'all-linear' or None, got {targets!r}")
        if len(targets) == 0:
            raise ValueError("target_modules: expected at least one module name (or None for "
                             "every nn.Linear), got an empty list")
        bad = [t for t in targets if not isinstance(t, str) or not t]
        if bad:
            raise TypeError(f"target_modules: expected non-empty strings, got {bad!r}")
        object.__setattr__(self, "target_modules", tuple(sorted(targets)))

    def matches(self, name):
        """Whether a module's dotted name is targeted (PEFT's rule; None matches every name)."""
        targets = self.target_modules
        return targets in (None, ALL_LINEAR) or _matches(targets, name)

    def settings_for(self, name):
        """(r, lora_alpha) of the layer called `name`, after rank_pattern and alpha_pattern."""
        return (_pattern_value(self.rank_pattern, name, self.r),
                _pattern_value(self.alpha_pattern, name, self.lora_alpha))


def check_init_lora_weights(where, value):
    """Refuse PEFT's inits that rewrite the base weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA):
    their adapter fits only the rewritten base, not the pretrained one we would put it on."""
    name = value.lower() if isinstance(value, str) else value
    if isinstance(name, str) and name.startswith(REWRITES_BASE_WEIGHT):
        raise ValueError(
            f"{where}: {value!r} is an init that PEFT computes from the base weight and then "
            f"subtracts from it (W0 becomes W0 - s·B A), so its adapter only fits that rewritten "
            f"base; dora_minimal does not rewrite base weights, and on the pretrained base the "
            f"adapter would give a different model. In PEFT, save it with save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...), which turns it into a plain LoRA "
            f"adapter (init_lora_weights true) that loads here")
    if not any(name is v or (isinstance(v, str) and name == v) for v in INIT_ONLY):
        raise ValueError(f"{where}: expected one of {list(INIT_ONLY)} (inits that leave the "
                         f"base weight as it is), got {value!r}")


def _pattern_value(pattern, name, default):
    for key, value in pattern.items():  # PEFT's get_pattern_key: the first key that matches
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_regex(what, text):
    if not isinstance(text, str):
        raise TypeError(f"{what}: expected a regular expression (str), got {text!r}")
    try:
        re.compile(text)
    except re.error as error:
        raise ValueError(f"{what}: {text!r} is not a regular expression ({error})") from None


def _name_matches(name, target):
    return name == target or name.endswith("." + target)


def adapter_layers(model):
    """[(dotted name, adapter layer)] for every adapter layer in the model, each once."""
    classes = tuple(kind.adapter for kind in ADAPTER_KINDS)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def _names_by_module(model):
    """{module: [every dotted name it is registered under]} (tied modules have several)."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(module, []).append(name)
    return names


def _replace(model, names, new_module):
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new_module)


def _output_layer(model, task_type):
    """What "all-linear" leaves out, as PEFT does for a transformers model (one that has
    get_output_embeddings()): its output embedding, or for task_type "SEQ_CLS" without one, its
    `score` or `classifier` head. A plain torch model keeps every nn.Linear, as in PEFT."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    output = get()
    if output is None and task_type == "SEQ_CLS":
        heads = [getattr(model, name, None) for name in ("score", "classifier")]
        output = next((head for head in heads if head is not None), None)
    return output


def default_targets(model):
    """What target_modules=None adapts in `model`: for a transformers model (one with a
    config.model_type), PEFT's default for its type (DEFAULT_TARGET_MODULES), and a ValueError
    where PEFT has none; for any other model None, which means every nn.Linear (and
    transformers' Conv1D) whose weight is not tied to another module's."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    if model_type not in DEFAULT_TARGET_MODULES:
        kinds = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                        if kind_of(m) is not None and kind_of(m).linear})
        raise ValueError(f"target_modules: PEFT has no default target_modules for model type "
                         f"{model_type!r} ({type(model).__name__}), so neither do we: please "
                         f"specify target_modules, e.g. 'all-linear' or some of the layer names "
                         f"{kinds[:12]}")
    return DEFAULT_TARGET_MODULES[model_type]


def _shared_weights(model):
    """{module: names of the other modules that hold one of its parameters} (a tied weight)."""
    owners = {}  # id(parameter) -> {module: its first name}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(module, name)
    return {module: sorted({n for p in module.parameters(recurse=False)
                            for other, n in owners[id(p)].items() if other is not module})
            for name, module in model.named_modules()}


def modules_to_save(model, config):
    """[(every name, module)] of the modules that config.modules_to_save trains in full: those
    with a name that is, or ends with, one of its names (only the outermost of nested ones).
    ValueError for a name that matches no module, except the heads that task_type adds."""
    wanted = config.modules_to_save or ()
    found = [(n, m) for m, n in _names_by_module(model).items()
             if any(_name_matches(name, w) for name in n for w in wanted)]
    optional = TASK_HEADS.get(config.task_type, ())
    missing = [w for w in wanted if w not in optional
               and not any(_name_matches(name, w) for n, _ in found for name in n)]
    if missing:
        raise ValueError(f"modules_to_save: {missing} match no module of the model")
    inner = {sub for _, m in found for sub in m.modules() if sub is not m}
    return [(n, m) for n, m in found if m not in inner]


def _matches(targets, name):
    """Whether `targets` (a regex or names, see LoraConfig) selects the module called `name`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_name_matches(name, t) for t in targets)


def build_adapters(model, config):
    """[(every name of a targeted module, its new adapter)], the model untouched. Raises
    ValueError when a target matches no module or a module that cannot be adapted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a dora_minimal.LoraConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise ValueError("model: already has adapter layers; merge_adapters() it first")
    if kind_of(model) is not None:
        torch_nn = "nn." if type(model).__module__.startswith("torch.nn") else ""
        raise ValueError(f"model: is itself an {torch_nn}{type(model).__name__}, which cannot be "
                         f"replaced in place; use its adapter class's from_base (for nn.Linear, "
                         f"DoRALinear.from_base(model, ...)) or wrap it in a module")
    names = _names_by_module(model)
    adaptable = {m: n for m, n in names.items() if kind_of(m) is not None}
    listed = [n[0] for n in adaptable.values()]
    saved = {sub for _, m in modules_to_save(model, config) for sub in m.modules()}
    shared = _shared_weights(model)
    named = config.target_modules not in (None, ALL_LINEAR)  # by the user, not by default
    targets = default_targets(model) if config.target_modules is None else config.target_modules
    if targets in (None, ALL_LINEAR):
        skip = _output_layer(model, config.task_type) if targets == ALL_LINEAR else None
        chosen = [m for m in adaptable if kind_of(m).linear and m is not skip and not shared[m]]
    else:
        chosen = [m for m, n in names.items() if any(_matches(targets, name) for name in n)]
    lazy = [f"{names[m][0]} ({type(m).__name__})" for m in chosen
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"model: {lazy} are not materialized yet (their weight shapes are "
                         f"known only after a first forward); run the model once on an "
                         f"example input, then adapt it")
    if targets not in (None, ALL_LINEAR):
        wrong = [f"{names[m][0]} ({type(m).__name__})" for m in chosen if m not in adaptable]
        if wrong:
            raise ValueError(f"target_modules: {targets!r} matches {wrong}, which cannot be "
                             f"adapted; the layers that can are {listed}")
        every_name = [name for n in names.values() for name in n]
        unmatched = (([] if chosen else [targets]) if isinstance(targets, str) else
                     [t for t in targets if not any(_name_matches(n, t) for n in every_name)])
        if unmatched and named:
            raise ValueError(f"target_modules: {unmatched} match no layer of the model; the "
                             f"layers that can be adapted are {listed}")
    chosen = [m for m in chosen if m not in saved]  # (as PEFT: a module to save is not adapted)
    if not chosen:
        raise ValueError("model: has no nn.Linear layer to adapt" if targets in
                         (None, ALL_LINEAR) else f"model: has no layer to adapt among "
                         f"target_modules {targets!r} (none, or only modules_to_save)")
    for module in chosen:
        if shared[module]:
            warnings.warn(f"{names[module][0]}: its weight is tied to {shared[module]} (the same "
                          f"tensor); adapting it copies the weight, which breaks the tie: "
                          f"training or merging changes {names[module][0]} alone", stacklevel=3)
    adapters = []
    for module in chosen:
        try:
            adapters.append((names[module], kind_of(module).adapter.from_base(
                module, *config.settings_for(names[module][0]), config.lora_dropout,
                config.use_dora, config.detach_norm)))
        except (ValueError, TypeError) as error:
            raise type(error)(f"model: cannot adapt {names[module][0]} "
                              f"({type(module).__name__}): {error}") from None
    return adapters


def install_adapters(model, adapters, saved=(), config=None):
    """Freeze every parameter of the model, put each adapter under all of its names, and make
    the modules to save ([(names, module)]) trainable, marked as such for save_pretrained,
    which also reads the config's task_type, base_model_name_or_path and revision from the
    model."""
    config = config or LoraConfig()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for names, adapter in adapters:
        _replace(model, names, adapter)
    mark_adapted(model, saved, config)
    _warn_on_whole_model_save(model)
    return model


def mark_adapted(model, saved, config):
    """Make the modules to save ([(names, module)]) trainable, marked with the config's
    task_type, and keep on the model what save_pretrained writes beside the layers."""
    for _, module in saved:
        module.requires_grad_(True)
        setattr(module, TRAINED_IN_FULL, config.task_type)
    setattr(model, ADAPTED_MODEL, {key: getattr(config, key) for key in
                                   ("task_type", "base_model_name_or_path", "revision")})


WHOLE_MODEL_SAVE = (
    "save_pretrained of a transformers model with dora_minimal adapters writes the whole model, "
    "the adapters' tensors under dora_minimal's own keys (as Trainer's checkpoints need, and "
    "resume_from_checkpoint reads them back); transformers' from_pretrained of that folder "
    "drops those tensors (it only lists them as unexpected keys) and gives the base model. To "
    "export, use dora_minimal.save_pretrained(model, directory) for the adapter (PEFT's "
    "files), or dora_minimal.merge_and_unload(model).save_pretrained(directory) for a plain "
    "model with the adapters merged in")


class _SavePretrainedWithWarning:
    """A transformers model's own save_pretrained (Trainer.save_model and its checkpoints call
    it), with WHOLE_MODEL_SAVE warned while the model has adapter layers. An object holding
    the model, not a closure: copy.deepcopy and pickle (torch.save of the whole model) copy it
    with the model, so a copy saves itself. It warns once per model (a copy warns again): a
    Trainer saves a checkpoint every save_steps, and Python's once-per-line rule does not hold
    there (each catch_warnings block resets it)."""

    def __init__(self, model):
        self.model = model
        self.warned = False

    def __getstate__(self):  # (deepcopy and pickle: a copy has not warned yet)
        return {"model": self.model, "warned": False}

    def __call__(self, *args, **kwargs):
        if not self.warned and adapter_layers(self.model):
            self.warned = True
            warnings.warn(WHOLE_MODEL_SAVE, UserWarning, stacklevel=2)
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def _warn_on_whole_model_save(model):
    """Give a transformers model (one with a config and a save_pretrained method) an instance
    save_pretrained that warns first."""
    if getattr(model, "config", None) is not None and callable(
            getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _SavePretrainedWithWarning(model)


def saved_modules(model):
    """[(name, module)] of the modules trained in full (modules_to_save) next to the adapters."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, TRAINED_IN_FULL)]


def inject_adapters(model, config):
    """Replace each targeted layer by an adapter layer (in place), freeze every other parameter
    but those of config.modules_to_save, and return the model (PEFT's get_peft_model). A module
    registered under several names is targeted when any of them matches, adapted once, and
    every name sees the adapter. On any error the model is unchanged."""
    adapters = build_adapters(model, config)
    install_adapters(model, adapters, modules_to_save(model, config), config)
    if config.inference_mode:  # PEFT's inference_mode: nothing trains
        model.requires_grad_(False)
    return model


def merge_adapters(model):
    """Merge in place and return the model, as PEFT's merge_and_unload: every adapter layer
    (under all of its names) becomes the plain module holding the merged weight W'; frozen
    weights stay frozen, and modules trained in full (modules_to_save) keep their trained
    weights. If a layer cannot be merged, ValueError names it and nothing changes."""
    names = _names_by_module(model)
    merged = []
    for name, layer in adapter_layers(model):  # all checked before any swap
        try:
            merged.append((names[layer], layer.to_base()))
        except ValueError as error:
            raise ValueError(f"merge_adapters: layer {name}: {error}") from None
    for layer_names, module in merged:
        _replace(model, layer_names, module)
    for _, module in saved_modules(model):
        delattr(module, TRAINED_IN_FULL)
    vars(model).pop(ADAPTED_MODEL, None)
    if isinstance(vars(model).get("save_pretrained"), _SavePretrainedWithWarning):
        del model.save_pretrained  # the class's own again
    return model


def reset_magnitude(model):
    """m = ‖W0‖_c from the current weights in every DoRA layer: call it after loading
    pretrained weights into a model that already has adapters. Returns the model."""
    layers = adapter_layers(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"reset_magnitude: layers {merged} are merged; unmerge() them first")
    norms = [(layer, layer._weight_norm()) for _, layer in layers]  # all checked first
    with torch.no_grad():
        for layer, norm in norms:
            if norm is not None:
                layer.magnitude.copy_(norm)
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


def print_trainable_parameters(model):
    """Print the counts as PEFT's model.print_trainable_parameters() does, then a line saying
    which layers are adapted (the end of their names, counted where several share it) and
    which modules are trained in full (modules_to_save)."""
    print(trainable_parameters(model))
    names = [n for n, _ in adapter_layers(model)]
    ends = [n.rpartition(".")[2] for n in names]
    parts = [f"{end} ({ends.count(end)})" if ends.count(end) > 1 else names[ends.index(end)]
             for end in dict.fromkeys(ends)]
    saved = [n for n, _ in saved_modules(model)]
    print(f"adapted layers ({len(names)}): {', '.join(parts) or 'none'}"
          + (f"; trained in full: {', '.join(saved)}" if saved else ""))


get_peft_model = inject_adapters
merge_and_unload = merge_adapters
