"""Saving and loading adapters: our own keys, PEFT's keys, and PEFT's saved-adapter files.

    state = adapter_state_dict(model)              # {"0.fc1.lora_A": ..., ...} (torch.save it)
    save_pretrained(model, "adapter/")             # adapter_config.json + adapter_model.safetensors
    model = from_pretrained(plain_model, "adapter/")   # also what PEFT's save_pretrained writes

Every load checks every value (keys, shape, dtype, layout, device, finite) before it changes
anything: on an error the model is unchanged. PEFT itself is never imported.
"""

import json
import os
import re
from pathlib import Path

import torch

from .adapters import (ADAPTED_MODEL, LoraConfig, adapter_layers, build_adapters,
                       check_init_lora_weights, install_adapters, mark_adapted,
                       modules_to_save, saved_modules, TRAINED_IN_FULL)
from .checks import check_bool

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields that change what PEFT builds, with the value we can honour
UNSUPPORTED_FIELDS = {"use_rslora": False,
                      "layers_to_transform": None, "layers_pattern": None,
                      "exclude_modules": None, "lora_bias": False,
                      "layer_replication": None, "target_parameters": None,
                      "trainable_token_indices": None, "use_qalora": False,
                      "alora_invocation_tokens": None, "megatron_config": None,
                      "velora_config": None, "monteclora_config": None, "use_bdlora": None,
                      "arrow_config": None, "kasa_config": None}


def _target_modules(model, names):
    """The adapted layers' full names as PEFT's target_modules: a list (each matches a name or
    its end), or, where the list would also match a layer that is not adapted ("0" matches
    "1.0"), a regular expression for exactly these names."""
    names = sorted(names)
    every = [n for n, _ in model.named_modules() if n]
    if all(n in names for n in every if any(n == t or n.endswith("." + t) for t in names)):
        return names
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def _own_tensors(name, layer):
    """{"<layer>.lora_A" | ".lora_B" | ".magnitude": the parameter} (a LoRA layer has no
    magnitude)."""
    return {f"{name}.{key}": getattr(layer, key) for key in ("lora_A", "lora_B", "magnitude")
            if getattr(layer, key) is not None}


def _peft_tensors(name, layer):
    """The same tensors under PEFT's keys and in PEFT's shapes (views of the parameters)."""
    return {f"{PEFT_PREFIX}{name}.{suffix}": t for suffix, t in layer.peft_tensors().items()}


def _module_tensors(name, module, prefix=""):
    """A module trained in full (modules_to_save): its state dict under "<prefix><name>.", the
    keys PEFT saves it under (the tensors themselves, so that loading writes into them)."""
    return {f"{prefix}{name}.{key}": t for key, t in module.state_dict(keep_vars=True).items()}


def _adapter_tensors(layers, tensors_of, saved=(), prefix=""):
    """{key: tensor} of every adapter tensor of the (name, layer) pairs given, then of the
    (name, module) pairs trained in full."""
    return {**{key: t for name, layer in layers for key, t in tensors_of(name, layer).items()},
            **{key: t for name, module in saved
               for key, t in _module_tensors(name, module, prefix).items()}}


def _checked_values(state, targets, what):
    """{key: state[key] in its target's dtype and on its device}, after checking every value;
    raises, having changed nothing, if any key or value does not fit."""
    if not isinstance(state, dict):
        raise TypeError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    values = {}
    for key, target in targets.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: {key} expected a tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{what}: {key} expected a dense (strided) tensor, got layout "
                            f"{value.layout}")
        if value.is_meta:
            raise ValueError(f"{what}: {key} is on the meta device, so it holds no values")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{what}: {key} expected shape {tuple(target.shape)}, "
                             f"got {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{what}: {key} expected a floating dtype, got {value.dtype}")
        try:
            moved = value.detach().to(device=target.device, dtype=target.dtype)
        except RuntimeError as error:
            raise ValueError(f"{what}: {key} cannot be moved from {value.device} to "
                             f"{target.device}: {error}") from None
        finite = moved if not moved.is_meta else value.detach().to(target.dtype)  # (a meta model)
        if not torch.isfinite(finite).all():
            raise ValueError(f"{what}: {key} holds NaN or inf (in {target.dtype})")
        value = moved
        values[key] = value
    return values


def _load(layers, state, tensors_of, what, saved=(), prefix=""):
    """Copy state into the adapter tensors of `layers` and of the modules `saved` (trained in
    full), or raise and change nothing."""
    targets = _adapter_tensors(layers, tensors_of, saved, prefix)
    values = _checked_values(state, targets, what)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{what}: layers {merged} are merged; unmerge() them first")
    with torch.no_grad():
        for key, value in values.items():
            targets[key].copy_(value)


def adapter_state_dict(model):
    """{"<layer>.lora_A": ..., "<layer>.lora_B": ..., "<layer>.magnitude": ...}, and the state
    of each module trained in full ("<module>.weight", ...), detached copies."""
    return {key: t.detach().clone() for key, t in _adapter_tensors(
        adapter_layers(model), _own_tensors, saved_modules(model)).items()}


def load_adapter_state_dict(model, state):
    """Load what adapter_state_dict saved. Names and shapes must match exactly; on a mismatch
    ValueError says which, and the model is unchanged."""
    _load(adapter_layers(model), state, _own_tensors, "load_adapter_state_dict",
          saved_modules(model))
    return model


def to_peft_state_dict(model):
    """The adapter under PEFT's saved-adapter keys (as get_peft_model_state_dict returns them):
    base_model.model.<path>.lora_A.weight, .lora_B.weight and .lora_magnitude_vector, and each
    module trained in full (modules_to_save) as base_model.model.<module>.weight, ..."""
    return {key: t.detach().clone() for key, t in _adapter_tensors(
        adapter_layers(model), _peft_tensors, saved_modules(model), PEFT_PREFIX).items()}


def from_peft_state_dict(model, state):
    """Load an adapter saved by PEFT (or by to_peft_state_dict) into a model with the same
    adapter layers and modules to save. Keys and shapes must match; on a mismatch the model is
    unchanged."""
    _load(adapter_layers(model), state, _peft_tensors, "from_peft_state_dict",
          saved_modules(model), PEFT_PREFIX)
    return model


get_peft_model_state_dict = to_peft_state_dict
set_peft_model_state_dict = from_peft_state_dict


# --- PEFT's files ---------------------------------------------------------------------------

def _settings(layer):
    return {"r": layer.r, "lora_alpha": layer.lora_alpha, "lora_dropout": layer.lora_dropout,
            "use_dora": layer.use_dora}


def _number(x):
    return int(x) if float(x).is_integer() else x


def save_pretrained(model, directory, safe_serialization=None):
    """Write the model's adapter as PEFT's save_pretrained does: adapter_config.json (PEFT's
    LoraConfig fields; target_modules lists the adapted layers' full names) and the weights
    under PEFT's keys in adapter_model.safetensors (safe_serialization True, or None with the
    safetensors package importable) or adapter_model.bin (torch.save). The other weights file,
    if the directory has one, is removed so that no reader picks up a stale adapter.
    Modules trained in full (modules_to_save, a task_type's head) are saved with it, as PEFT
    does: their tensors under base_model.model.<module>.*, their names in modules_to_save.
    The config also holds PEFT's task_type, base_model_name_or_path (where the model was
    loaded from, if the model knows) and revision, so that PEFT's AutoPeftModel classes and
    PeftModel.from_pretrained build the task's class from it.
    detach_norm is a training choice of ours, not saved (PEFT has no such field)."""
    layers, saved = adapter_layers(model), saved_modules(model)
    if not layers:
        raise ValueError("save_pretrained: the model has no adapter layers")
    kept = {id(p) for _, module in layers + saved for p in module.parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
    if trained:
        raise ValueError(f"save_pretrained: {trained[:5]} require grad but are neither part of "
                         f"an adapter nor of LoraConfig(modules_to_save=...), and only those "
                         f"are saved; name their modules in modules_to_save, or freeze them")
    settings = {name: _settings(layer) for name, layer in layers}
    first = dict(next(iter(settings.values())))  # becomes the config's shared values
    shared = ("lora_dropout", "use_dora")  # PEFT's config holds these once for all layers
    different = {name: {k: s[k] for k in shared} for name, s in settings.items()
                 if any(s[k] != first[k] for k in shared)}
    if different:
        raise ValueError(f"save_pretrained: the adapter layers differ in lora_dropout or "
                         f"use_dora ({layers[0][0]}: {first}, but {different}), which PEFT's "
                         f"config holds once for all layers")
    # r and lora_alpha: the most common value, the others per layer in PEFT's patterns,
    # each key "^<escaped name>" matching that one layer's whole name under PEFT's rule
    patterns = {}
    for key, field in [("r", "rank_pattern"), ("lora_alpha", "alpha_pattern")]:
        values = [s[key] for s in settings.values()]
        first[key] = max(values, key=values.count)
        patterns[field] = {"^" + re.escape(name): _number(s[key]) for name, s in
                           settings.items() if s[key] != first[key]}
    if safe_serialization is None:
        safe_serialization = _safetensors() is not None
    if safe_serialization and _safetensors() is None:
        raise ImportError("save_pretrained: safe_serialization=True needs the safetensors "
                          "package (pip install safetensors); or pass safe_serialization=False")
    task_types = {getattr(module, TRAINED_IN_FULL) for _, module in saved} - {None}
    adapted = getattr(model, ADAPTED_MODEL, {})
    task_type = adapted.get("task_type") or min(task_types, default=None)
    name_or_path = adapted.get("base_model_name_or_path") or _name_or_path(model)
    # without a task_type PEFT's AutoPeftModel finds the base model's class here
    auto_mapping = None if task_type or getattr(model, "config", None) is None else {
        "base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    config = {"base_model_name_or_path": name_or_path, "revision": adapted.get("revision"),
              "peft_type": "LORA", "task_type": task_type, "auto_mapping": auto_mapping,
              "r": first["r"],
              "lora_alpha": _number(first["lora_alpha"]), "lora_dropout": first["lora_dropout"],
              "target_modules": _target_modules(model, [name for name, _ in layers]),
              "use_dora": first["use_dora"], "bias": "none", "use_rslora": False,
              "fan_in_fan_out": any(layer.FAN_IN_FAN_OUT for _, layer in layers),
              **patterns, "modules_to_save": [name for name, _ in saved] or None,
              "init_lora_weights": True, "inference_mode": True}
    state = {k: v.contiguous() for k, v in to_peft_state_dict(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    name, other = (SAFETENSORS_NAME, BIN_NAME) if safe_serialization else (BIN_NAME,
                                                                          SAFETENSORS_NAME)
    if safe_serialization:
        _safetensors().save_file(state, str(directory / name), metadata={"format": "pt"})
    else:
        torch.save(state, directory / name)
    if (directory / other).exists():
        os.remove(directory / other)


def _name_or_path(model):
    """Where a transformers model was loaded from (its name_or_path, as PEFT reads it, or its
    config's _name_or_path), None for a model built from a config or a plain torch model."""
    config = getattr(model, "config", None)
    return (vars(model).get("name_or_path") or getattr(config, "_name_or_path", None)
            or None)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        return None
    return safetensors.torch


# the type each field of adapter_config.json must have where it is set
_FIELD_TYPES = {"peft_type": (str,), "r": (int,), "lora_alpha": (int, float),
                "lora_dropout": (int, float), "target_modules": (str, list),
                "use_dora": (bool,), "fan_in_fan_out": (bool,), "bias": (str,),
                "task_type": (str,), "modules_to_save": (list,), "rank_pattern": (dict,),
                "alpha_pattern": (dict,), "inference_mode": (bool,),
                "base_model_name_or_path": (str,), "revision": (str,)}
# the fields that PEFT writes null for "not set"; a null in any other is an error (PEFT never
# writes one there), while a field that is left out takes PEFT's default
_NULLABLE = ("target_modules", "task_type", "modules_to_save", "rank_pattern", "alpha_pattern",
             "base_model_name_or_path", "revision")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list",
               bool: "true or false", dict: "an object"}


def _read_json(path):
    """adapter_config.json's object; ValueError naming the file if it is not one."""
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"from_pretrained: {path} is not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"from_pretrained: {path} should hold a JSON object of LoraConfig "
                         f"fields, but holds a {type(saved).__name__}")
    for field, types in _FIELD_TYPES.items():
        if field not in saved or (saved[field] is None and field in _NULLABLE):
            continue
        value = saved[field]
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if wrong:
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ValueError(f"from_pretrained: {path} field {field!r}: expected {expected}, "
                             f"got {json.dumps(value)}")
    return saved


def read_config(directory, detach_norm=True):
    """The LoraConfig an adapter_config.json describes; ValueError naming the file and the
    field for a value of the wrong type or one (a field of PEFT's LoraConfig) that
    dora_minimal cannot honour."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: {path} not found (an adapter directory "
                                f"holds {CONFIG_NAME} and the weights)")
    saved = _read_json(path)
    if saved.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"from_pretrained: {path} holds a {saved['peft_type']} adapter; only "
                         f"LORA (with or without use_dora) is supported")
    for field, default in UNSUPPORTED_FIELDS.items():
        value = saved.get(field, default)
        if value != default and value not in (None, False, {}, []):
            raise ValueError(f"from_pretrained: {path} sets {field}={value!r}, which "
                             f"dora_minimal does not support")
    check_init_lora_weights(f"from_pretrained: {path} init_lora_weights",
                            saved.get("init_lora_weights", True))
    if saved.get("target_modules") is None:
        raise ValueError(f"from_pretrained: {path} names no target_modules")
    fields = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None,
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
              "task_type": None, "fan_in_fan_out": False, "modules_to_save": None,
              "base_model_name_or_path": None, "revision": None}
    values = {field: default if saved.get(field) is None else saved[field]
              for field, default in fields.items()}
    try:
        return LoraConfig(**values, detach_norm=detach_norm)
    except (TypeError, ValueError) as error:
        raise ValueError(f"from_pretrained: {path}: {error}") from None


def _read_weights(directory):
    """{key: tensor} of the directory's weights file; ValueError naming the file if it cannot
    be read (truncated, not a weights file, not a dict of tensors)."""
    directory = Path(directory)
    path = directory / SAFETENSORS_NAME
    if path.is_file():
        if _safetensors() is None:
            raise ImportError(f"from_pretrained: {path} needs the safetensors package (pip "
                              f"install safetensors)")
        read = lambda: _safetensors().load_file(str(path))  # noqa: E731
    elif (directory / BIN_NAME).is_file():
        path = directory / BIN_NAME
        read = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    else:
        raise FileNotFoundError(f"from_pretrained: {directory} has neither {SAFETENSORS_NAME} "
                                f"nor {BIN_NAME}")
    try:
        state = read()
    except Exception as error:  # each reader has its own errors (SafetensorError, pickle's...)
        raise ValueError(f"from_pretrained: cannot read {path} (a truncated or damaged "
                         f"file?): {type(error).__name__}: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"from_pretrained: {path} should hold a dict of tensors, but holds a "
                         f"{type(state).__name__}")
    return state, path


def from_pretrained(model, directory, detach_norm=True, is_trainable=True):
    """Adapt a plain model as the directory's adapter_config.json says and load its weights
    (written by save_pretrained here or in PEFT), then return the model. A model that already
    has adapter layers gets the weights if its layers match the saved settings. On any
    mismatch (settings, targets, keys, shapes, a field or file that cannot be read) an error
    that names it, and the model is unchanged.
    is_trainable (PEFT's keyword): True (the default here, as after get_peft_model) leaves the
    adapters and the modules trained in full trainable, to train on; False freezes them, for
    inference (PEFT's default)."""
    check_bool("is_trainable", is_trainable)
    config = read_config(directory, detach_norm)
    state, path = _read_weights(directory)
    what = f"from_pretrained: {path}"
    layers = adapter_layers(model)
    saved = modules_to_save(model, config)
    heads = [(names[0], module) for names, module in saved]
    if not layers:
        adapters = build_adapters(model, config)
        _load([(names[0], adapter) for names, adapter in adapters], state, _peft_tensors,
              what, heads, PEFT_PREFIX)
        install_adapters(model, adapters, saved, config)
    else:
        for name, layer in layers:
            r, lora_alpha = config.settings_for(name)
            wanted = {"r": r, "lora_alpha": float(lora_alpha), "use_dora": config.use_dora}
            found = {key: getattr(layer, key) for key in wanted}
            if found != wanted:
                raise ValueError(f"from_pretrained: layer {name} has {found}, the saved "
                                 f"adapter {wanted}")
            if not config.matches(name):
                raise ValueError(f"from_pretrained: layer {name} is not among the saved "
                                 f"target_modules {config.target_modules!r}")
        _load(layers, state, _peft_tensors, what, heads, PEFT_PREFIX)
        mark_adapted(model, saved, config)
    if not is_trainable:
        for _, layer in adapter_layers(model):
            layer.requires_grad_(False)
        for _, module in saved_modules(model):
            module.requires_grad_(False)
    return model
