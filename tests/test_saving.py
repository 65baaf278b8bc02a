"""Saving and loading adapters: checked, atomic loads; save_pretrained / from_pretrained in PEFT's
layout, both file kinds, and (where PEFT is importable) both ways with PEFT itself."""

import copy
import json
import sys

import pytest
import torch
from torch import nn

import dora_minimal as dm
from helpers import rel_error
from test_adapters import same_state, state_of, toy_model, trained

CONFIG = dm.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=True)


def bad_value(kind, like):
    """A value that must be refused in place of the tensor `like`."""
    return {"sparse": lambda: like.to_sparse(),
            "meta": lambda: like.to("meta"),
            "nan": lambda: like.clone().fill_(float("nan")),
            "overflow": lambda: like.clone().fill_(1e300),  # inf once rounded to float32
            "integer": lambda: like.to(torch.int64),
            "shape": lambda: like[..., :1].clone(),
            "not a tensor": lambda: like.tolist()}[kind]()


@pytest.mark.parametrize("kind", ["sparse", "meta", "nan", "overflow", "integer", "shape",
                                  "not a tensor"])
@pytest.mark.parametrize("peft_keys", [False, True])
def test_a_bad_value_in_the_last_key_changes_no_layer(kind, peft_keys):
    save, load = ((dm.to_peft_state_dict, dm.from_peft_state_dict) if peft_keys else
                  (dm.adapter_state_dict, dm.load_adapter_state_dict))
    state = save(trained(dm.inject_adapters(toy_model(), CONFIG)))
    target = dm.inject_adapters(toy_model(), CONFIG).float()  # float32: 1e300 overflows
    last = list(state)[-1]
    assert list(state) == list(save(target)) and "1.fc2" in last  # the last layer's last key
    state[last] = bad_value(kind, state[last])
    before = state_of(target)
    message = {"sparse": "dense", "meta": "meta device", "nan": "NaN or inf",
               "overflow": "NaN or inf", "integer": "floating dtype", "shape": "expected shape",
               "not a tensor": "expected a tensor"}[kind]
    with pytest.raises((ValueError, TypeError), match=f"{last}.*{message}"):
        load(target, state)
    assert same_state(state_of(target), before)


def test_values_are_converted_to_each_tensors_dtype_and_device():
    state = dm.adapter_state_dict(trained(dm.inject_adapters(toy_model(), CONFIG)))
    target = dm.inject_adapters(toy_model(), CONFIG)  # float64
    dm.load_adapter_state_dict(target, {k: v.float() for k, v in state.items()})
    for key, value in dm.adapter_state_dict(target).items():
        assert value.dtype == torch.float64 and torch.equal(value, state[key].float().double())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_values_move_to_the_device_of_each_tensor():
    state = dm.adapter_state_dict(trained(dm.inject_adapters(toy_model(), CONFIG)))
    on_gpu = dm.inject_adapters(toy_model(), CONFIG).cuda()
    dm.load_adapter_state_dict(on_gpu, state)  # CPU values into a CUDA model
    back = dm.load_adapter_state_dict(dm.inject_adapters(toy_model(), CONFIG),
                                      dm.adapter_state_dict(on_gpu))  # and back
    for key, value in dm.adapter_state_dict(back).items():
        assert value.device.type == "cpu" and torch.equal(value, state[key])


@pytest.mark.interop
@pytest.mark.parametrize("safe", [False, True])
def test_save_pretrained_then_from_pretrained_gives_the_same_model(tmp_path, safe):
    if safe:
        pytest.importorskip("safetensors")
    source = trained(dm.inject_adapters(toy_model(), CONFIG))
    dm.save_pretrained(source, tmp_path, safe_serialization=safe)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_config.json",
                     "adapter_model.safetensors" if safe else "adapter_model.bin"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["use_dora"],
            saved["target_modules"]) == ("LORA", 2, 6, True, ["0.fc1", "0.fc2", "1.fc1",
                                                               "1.fc2"])
    plain = toy_model()
    loaded = dm.from_pretrained(plain, tmp_path, detach_norm=False)
    assert loaded is plain
    assert [n for n, _ in dm.adapter_layers(loaded)] == [n for n, _ in dm.adapter_layers(source)]
    assert all(layer.detach_norm is False for _, layer in dm.adapter_layers(loaded))
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), source(x))
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in source.named_parameters() if p.requires_grad}
    # into a model that already has matching adapter layers
    again = dm.from_pretrained(dm.inject_adapters(toy_model(), CONFIG), tmp_path)
    assert torch.equal(again(x), source(x))


@pytest.mark.interop
def test_saving_one_kind_removes_a_stale_file_of_the_other(tmp_path):
    pytest.importorskip("safetensors")
    model = trained(dm.inject_adapters(toy_model(), CONFIG))
    dm.save_pretrained(model, tmp_path, safe_serialization=True)
    dm.save_pretrained(model, tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    dm.save_pretrained(model, tmp_path, safe_serialization=True)
    assert not (tmp_path / "adapter_model.bin").exists()


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


MISMATCHES = {
    "targets match nothing": ({"target_modules": ["attn"]}, None, r"\['attn'\] match no layer"),
    "layer type": ({"target_modules": ["fc1", "norm"]}, None, r"0.norm \(LayerNorm\)"),
    "r": ({"r": 3}, None, r"expected shape \(3, 6\)"),
    "use_dora": ({"use_dora": False}, None, "unexpected keys.*lora_magnitude_vector"),
    "unknown key": ({}, "extra", r"unexpected keys \['extra'\]"),
    "rank_pattern": ({"rank_pattern": {"fc1": 4}}, None, r"0.fc1.lora_A.weight .*shape \(4, 6\)"),
    "alpha_pattern": ({"alpha_pattern": {"fc1": 4}}, "same", "'lora_alpha': 6.0.*'lora_alpha': 4"),
    "exclude_modules": ({"exclude_modules": ["fc1"]}, None, "exclude_modules=.*not support"),
    "rslora": ({"use_rslora": True}, None, "use_rslora=True"),
    "peft type": ({"peft_type": "IA3"}, None, "IA3 adapter"),
    "existing alpha": ({}, "alpha", "'lora_alpha': 8.0.*'lora_alpha': 6.0"),
    "existing r": ({}, "r", "'r': 3.*'r': 2"),
    "existing use_dora": ({}, "use_dora", "'use_dora': False.*'use_dora': True"),
    "existing targets": ({}, "targets", "layer 2 is not among"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_from_pretrained_refuses_a_mismatch_and_changes_nothing(tmp_path, case):
    changes, other, message = MISMATCHES[case]
    dm.save_pretrained(trained(dm.inject_adapters(toy_model(), CONFIG)), tmp_path,
                       safe_serialization=False)
    edit_config(tmp_path, **changes)
    model = toy_model()
    if other == "extra":
        state = torch.load(tmp_path / "adapter_model.bin")
        state["extra"] = torch.zeros(1, dtype=torch.float64)
        torch.save(state, tmp_path / "adapter_model.bin")
    elif other is not None:
        existing = {"alpha": dict(lora_alpha=8), "r": dict(r=3), "use_dora": dict(use_dora=False),
                    "targets": dict(target_modules=None), "same": {}}[other]
        settings = dict(r=2, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=True)
        dm.inject_adapters(model, dm.LoraConfig(**{**settings, **existing}))
    before = state_of(model)
    with pytest.raises(ValueError, match=message):
        dm.from_pretrained(model, tmp_path)
    assert same_state(state_of(model), before)
    assert all(isinstance(m, (nn.Linear, dm.DoRALinear)) for m in
               (model[0].fc1, model[1].fc2, model[2]))


MIXED = dm.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=True,
                      rank_pattern={"fc2": 4}, alpha_pattern={r"1\.fc\d": 8})


def test_layers_with_different_r_and_alpha_are_saved_with_peft_s_patterns(tmp_path):
    source = trained(dm.inject_adapters(toy_model(), MIXED))
    assert [(n, l.r, l.lora_alpha) for n, l in dm.adapter_layers(source)] == [
        ("0.fc1", 2, 6), ("0.fc2", 4, 6), ("1.fc1", 2, 8), ("1.fc2", 4, 8)]
    dm.save_pretrained(source, tmp_path, safe_serialization=False)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["rank_pattern"]) == (2, {r"^0\.fc2": 4, r"^1\.fc2": 4})
    assert (saved["lora_alpha"], saved["alpha_pattern"]) in [
        (6, {r"^1\.fc1": 8, r"^1\.fc2": 8}), (8, {r"^0\.fc1": 6, r"^0\.fc2": 6})]
    loaded = dm.from_pretrained(toy_model(), tmp_path)
    assert [(n, l.r, l.lora_alpha) for n, l in dm.adapter_layers(loaded)] == [
        (n, l.r, l.lora_alpha) for n, l in dm.adapter_layers(source)]
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), source(x))


def test_save_pretrained_refuses_layers_with_different_dropout_or_use_dora(tmp_path):
    model = dm.inject_adapters(toy_model(), dm.LoraConfig(r=2, target_modules=["fc1"]))
    model[2] = dm.DoRALinear.from_linear(model[2], r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(ValueError, match="differ in lora_dropout or use_dora.*'2'"):
        dm.save_pretrained(model, tmp_path)
    assert not tmp_path.joinpath("adapter_config.json").exists()


def test_without_safetensors_bin_is_written_and_a_safetensors_file_is_a_clear_error(
        tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    model = trained(dm.inject_adapters(toy_model(), CONFIG))
    dm.save_pretrained(model, tmp_path)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(ImportError, match="safe_serialization=True needs the safetensors"):
        dm.save_pretrained(model, tmp_path / "other", safe_serialization=True)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not read")
    plain = toy_model()
    with pytest.raises(ImportError, match="adapter_model.safetensors needs the safetensors "
                                          r"package \(pip install safetensors\)"):
        dm.from_pretrained(plain, tmp_path)
    assert not dm.adapter_layers(plain)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        dm.from_pretrained(plain, tmp_path / "missing")


# --- with PEFT itself (skipped where it is not installed) ---------------------------------

def train_steps(model, steps=3, seed=3):
    """A few AdamW steps on a random regression, so that every adapter tensor has moved."""
    torch.manual_seed(seed)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


@pytest.mark.interop
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("use_dora", [True, False])
def test_peft_loads_what_save_pretrained_writes(tmp_path, safe, use_dora):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    ours = train_steps(dm.get_peft_model(toy_model(), dm.LoraConfig(
        r=2, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=use_dora)))
    dm.save_pretrained(ours, tmp_path, safe_serialization=safe)
    fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())) <= fields
    theirs = peft.PeftModel.from_pretrained(toy_model(), tmp_path)
    x = torch.randn(5, 6, dtype=torch.float64)
    ours.eval()
    assert rel_error(theirs(x).detach().numpy(), ours(x).detach().numpy()) < 1e-13
    assert sorted(peft.get_peft_model_state_dict(theirs)) == sorted(dm.to_peft_state_dict(ours))


@pytest.mark.interop
def test_peft_and_we_read_each_others_rank_and_alpha_patterns(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    ours = train_steps(dm.get_peft_model(toy_model(), MIXED))
    dm.save_pretrained(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(toy_model(), tmp_path / "ours")
    x = torch.randn(5, 6, dtype=torch.float64)
    assert rel_error(theirs(x).detach().numpy(), ours(x).detach().numpy()) < 1e-13
    theirs = train_steps(peft.get_peft_model(toy_model(), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=True,
        rank_pattern={"fc2": 4}, alpha_pattern={r"1\.fc\d": 8})))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dm.from_pretrained(toy_model(), tmp_path / "theirs")
    assert [l.r for _, l in dm.adapter_layers(ours)] == [2, 4, 2, 4]
    theirs.eval()
    assert rel_error(ours(x).detach().numpy(), theirs(x).detach().numpy()) < 1e-13


@pytest.mark.interop
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("use_dora", [True, False])
def test_from_pretrained_loads_what_peft_saves(tmp_path, safe, use_dora):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    theirs = train_steps(peft.get_peft_model(toy_model(), peft.LoraConfig(
        r=2, lora_alpha=6, lora_dropout=0.1, target_modules=r".*\.fc\d", use_dora=use_dora)))
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    ours = dm.from_pretrained(toy_model(), tmp_path)
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    layers = dm.adapter_layers(ours)
    assert [n for n, _ in layers] == ["0.fc1", "0.fc2", "1.fc1", "1.fc2"]
    assert all((l.r, l.lora_alpha, l.lora_dropout, l.use_dora) == (2, 6, 0.1, use_dora)
               for _, l in layers)
    theirs.eval()
    ours.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert rel_error(ours(x).detach().numpy(), theirs(x).detach().numpy()) < 1e-13


@pytest.mark.interop
def test_a_transformers_model_both_ways_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2)

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).double().eval()

    tokens = torch.randint(0, 32, (2, 5))
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules="all-linear",
                                                           use_dora=True))
    trained_state = {k: v + 0.1 * torch.randn_like(v) for k, v in
                     peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, trained_state)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dm.from_pretrained(llama(), tmp_path / "theirs")
    assert len(dm.adapter_layers(ours)) == 7
    expected = theirs(tokens).logits.detach()
    assert rel_error(ours(tokens).logits.detach().numpy(), expected.numpy()) < 1e-12
    dm.save_pretrained(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    assert rel_error(again(tokens).logits.detach().numpy(), expected.numpy()) < 1e-12


# --- whole-model state dicts: tensors only ----------------------------------------------------

@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "gpt2_conv1d"])
@torch.no_grad()  # (a merged layer warns when it is trained)
def test_a_state_dict_holds_tensors_only_and_a_merged_layer_reloads_and_unmerges(kind, use_dora):
    from test_layer_kinds import make
    if kind == "linear":
        base, x = nn.Linear(4, 3).double(), torch.randn(2, 4, dtype=torch.float64)
        layer = trained(nn.Sequential(dm.DoRALinear.from_linear(base, 2, 4, use_dora=use_dora)))[0]
    else:
        base, layer, x = make(kind, use_dora=use_dora)
    for merged in (False, True):
        if merged:
            layer.merge()
        state = layer.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in state.values()), state
        fresh = copy.deepcopy(layer)
        fresh.unmerge() if merged else fresh.merge()  # the other state, to be overwritten
        fresh.load_state_dict(state)
        assert fresh.merged == merged and torch.equal(fresh(x), layer(x))
    fresh.unmerge()
    layer.unmerge()
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh(x), layer(x))


@pytest.mark.interop
@torch.no_grad()
def test_safetensors_saves_and_loads_a_whole_adapted_model_merged_or_not(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = trained(dm.get_peft_model(toy_model(), CONFIG))
    model[0].fc1.merge()
    safetensors.save_model(model, str(tmp_path / "model.safetensors"))
    fresh = dm.get_peft_model(toy_model(seed=3), CONFIG)
    safetensors.load_model(fresh, str(tmp_path / "model.safetensors"))
    x = torch.randn(4, 6, dtype=torch.float64)
    assert fresh[0].fc1.merged and not fresh[0].fc2.merged and torch.equal(fresh(x), model(x))
    fresh[0].fc1.unmerge()
    model[0].fc1.unmerge()
    assert torch.equal(fresh[0].fc1.weight, model[0].fc1.weight)


@pytest.mark.parametrize("extra", [torch.tensor([2.0]), torch.tensor([1.0]), torch.zeros(3),
                                   "merged"], ids=["flag 2", "no norms", "length", "string"])
def test_a_wrong_extra_state_is_a_clear_error(extra):
    layer = dm.DoRALinear(4, 3, r=2, lora_alpha=4)
    state = {**layer.state_dict(), "_extra_state": extra}
    with pytest.raises(ValueError, match=r"_extra_state expected a tensor \[0\] \(unmerged\) or "
                                         r"\[1, ‖V′‖_c...\] \(merged, "):
        layer.load_state_dict(state)


# --- modules to save and init_lora_weights in saved adapters ----------------------------------

def test_modules_to_save_are_saved_under_peft_s_keys_and_loaded_back(tmp_path):
    from test_adapters import Classifier
    config = dm.LoraConfig(r=2, use_dora=True, task_type="SEQ_CLS")
    source = trained(dm.get_peft_model(Classifier().double(), config))
    with torch.no_grad():
        source.classifier.weight.add_(1.0)  # a trained head
    dm.save_pretrained(source, tmp_path, safe_serialization=False)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["modules_to_save"], saved["task_type"]) == (["classifier"], "SEQ_CLS")
    keys = torch.load(tmp_path / "adapter_model.bin").keys()
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    loaded = dm.from_pretrained(Classifier().double(), tmp_path)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), source(x))
    assert loaded.classifier.weight.requires_grad and type(loaded.classifier) is nn.Linear
    assert dm.adapter_state_dict(loaded).keys() == dm.adapter_state_dict(source).keys()


def test_save_pretrained_still_refuses_a_module_unfrozen_by_hand(tmp_path):
    model = dm.get_peft_model(toy_model(), CONFIG)
    model[2].requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['2.weight', '2.bias'\] require grad.*modules_to_save"):
        dm.save_pretrained(model, tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "loftq"])
def test_a_saved_init_that_rewrote_the_base_weight_is_refused(tmp_path, init):
    dm.save_pretrained(trained(dm.get_peft_model(toy_model(), CONFIG)), tmp_path,
                       safe_serialization=False)
    edit_config(tmp_path, init_lora_weights=init)
    model = toy_model()
    with pytest.raises(ValueError, match=f"adapter_config.json init_lora_weights: '{init}' is "
                                         f"an init that PEFT computes from the base weight"):
        dm.from_pretrained(model, tmp_path)
    assert not dm.adapter_layers(model)
    for only_init in (False, "gaussian", "eva"):  # the base weight is the pretrained one
        edit_config(tmp_path, init_lora_weights=only_init)
        assert len(dm.adapter_layers(dm.from_pretrained(toy_model(), tmp_path))) == 4


# --- saved files of the wrong type or shape: our error, naming the field or the file ---------

MALFORMED = {  # what is written in place of the saved config or weights: the error's words
    "config a list": ("config", lambda c: [c], r"adapter_config.json should hold a JSON object.*"
                      r"holds a list"),
    "config not JSON": ("config", lambda c: "{", r"adapter_config.json is not valid JSON"),
    "target_modules 5": ("config", {"target_modules": 5}, r"'target_modules': expected a "
                         r"string or a list, got 5"),
    "target_modules [5]": ("config", {"target_modules": [5]}, r"target_modules: expected non-"),
    "fan_in_fan_out 'yes'": ("config", {"fan_in_fan_out": "yes"},
                             r"'fan_in_fan_out': expected true or false, got \"yes\""),
    "task_type 5": ("config", {"task_type": 5}, r"'task_type': expected a string, got 5"),
    "task_type unknown": ("config", {"task_type": "SEQ_CLASS"},
                          r"adapter_config.json: task_type: expected one of PEFT's task types"),
    "r '8'": ("config", {"r": "8"}, r"'r': expected an integer, got \"8\""),
    "r true": ("config", {"r": True}, r"'r': expected an integer, got true"),
    "r 0": ("config", {"r": 0}, r"adapter_config.json: r"),
    "r null": ("config", {"r": None}, r"'r': expected an integer, got null"),
    "lora_alpha null": ("config", {"lora_alpha": None}, r"'lora_alpha': expected an integer or "
                        r"a number, got null"),
    "use_dora null": ("config", {"use_dora": None}, r"'use_dora': expected true or false, got "
                      r"null"),
    "target_modules null": ("config", {"target_modules": None}, r"names no target_modules"),
    "lora_alpha '16'": ("config", {"lora_alpha": "16"}, r"'lora_alpha': expected an integer or "
                        r"a number"),
    "lora_dropout 2": ("config", {"lora_dropout": 2}, r"adapter_config.json: lora_dropout"),
    "use_dora 1": ("config", {"use_dora": 1}, r"'use_dora': expected true or false, got 1"),
    "modules_to_save a string": ("config", {"modules_to_save": "fc1"},
                                 r"'modules_to_save': expected a list"),
    "rank_pattern a list": ("config", {"rank_pattern": ["fc1"]},
                            r"'rank_pattern': expected an object"),
    "rank_pattern value": ("config", {"rank_pattern": {"fc1": "4"}}, r"rank_pattern\['fc1'\]"),
    "base_model_name_or_path 5": ("config", {"base_model_name_or_path": 5},
                                  r"'base_model_name_or_path': expected a string"),
    "weights truncated": ("weights", lambda b: b[:len(b) // 2],
                          r"cannot read .*adapter_model\.(safetensors|bin) \(a truncated"),
    "weights empty": ("weights", lambda b: b"", r"cannot read .*adapter_model"),
    "weights a list": ("weights", "list", r"adapter_model.bin should hold a dict of tensors"),
    "weights missing": ("weights", None, r"has neither adapter_model.safetensors nor "),
    "config missing": ("config", None, r"adapter_config.json not found"),
}


@pytest.mark.parametrize("case, safe", [(case, False) for case in MALFORMED] + [
    (case, True) for case in ("weights truncated", "weights empty", "weights missing")])
@pytest.mark.interop
def test_a_saved_file_of_the_wrong_type_is_our_error_and_changes_nothing(tmp_path, case, safe):
    if safe:
        pytest.importorskip("safetensors")
    what, change, message = MALFORMED[case]
    dm.save_pretrained(trained(dm.inject_adapters(toy_model(), CONFIG)), tmp_path,
                       safe_serialization=safe)
    config_path = tmp_path / "adapter_config.json"
    weights_path = tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    if change is None:
        (config_path if what == "config" else weights_path).unlink()
    elif what == "config" and isinstance(change, dict):
        edit_config(tmp_path, **change)
    elif what == "config":
        written = change(json.loads(config_path.read_text()))
        config_path.write_text(written if isinstance(written, str) else json.dumps(written))
    elif change == "list":
        torch.save(list(torch.load(weights_path).values()), weights_path)
    else:
        weights_path.write_bytes(change(weights_path.read_bytes()))
    for model in (toy_model(), dm.inject_adapters(toy_model(), CONFIG)):  # plain, or adapted
        before = state_of(model)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            dm.from_pretrained(model, tmp_path)
        assert same_state(state_of(model), before)
        assert isinstance(model[0].fc1, nn.Linear) == (not dm.adapter_layers(model))


@pytest.mark.parametrize("is_trainable", [True, False])
def test_from_pretrained_is_trainable_as_peft_s_keyword(tmp_path, is_trainable):
    config = dm.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["2"], use_dora=True)
    dm.save_pretrained(trained(dm.inject_adapters(toy_model(), config)), tmp_path,
                       safe_serialization=False)
    for model in (toy_model(), dm.inject_adapters(toy_model(), config)):  # plain, or adapted
        loaded = dm.from_pretrained(model, tmp_path, is_trainable=is_trainable)
        trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
        adapter = {n for n in dict(loaded.named_parameters()) if "lora_" in n or "magnitude"
                   in n or n.startswith("2.")}
        assert len(adapter) == 2 * 3 + 2 and trainable == (adapter if is_trainable else set())
    with pytest.raises(TypeError, match="is_trainable: expected True or False, got 'no'"):
        dm.from_pretrained(toy_model(), tmp_path, is_trainable="no")


def test_our_config_holds_peft_s_fields_task_type_included(tmp_path):
    model = dm.inject_adapters(toy_model(), dm.LoraConfig(r=2, target_modules=["fc1"],
                                                          task_type="CAUSAL_LM",
                                                          revision="v1"))
    dm.save_pretrained(model, tmp_path, safe_serialization=False)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("peft_type", "task_type", "base_model_name_or_path",
                                  "revision")} == {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                                                   "base_model_name_or_path": None,
                                                   "revision": "v1"}
    reloaded = dm.from_pretrained(toy_model(), tmp_path)
    dm.save_pretrained(reloaded, tmp_path / "again", safe_serialization=False)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == saved
    with pytest.raises(ValueError, match="task_type: expected one of PEFT's task types"):
        dm.LoraConfig(task_type="causal_lm")
