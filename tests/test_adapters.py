"""Adapters in toy models: LoraConfig, inject/merge, saving, PEFT keys, ΔM/ΔD,
DistributedDataParallel and torch.compile (the main command: test_toy.py)."""

import copy
import io
import os

import pytest
import torch
from torch import nn

import dora_minimal as dm
from helpers import rel_error


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Block(), Block(), nn.Linear(6, 3)).double()


def state_of(model):
    return copy.deepcopy(model.state_dict())


def same_state(a, b):
    """Equal state dicts, tensors compared exactly (extra states hold dicts and None)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k])
                                                                    for k in a)
    return a == b


def trained(model, seed=1):
    """Move every adapter away from its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in dm.adapters.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
            if layer.magnitude is not None:
                layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    return model


# --- LoraConfig -------------------------------------------------------------------------------

def test_lora_config_defaults_and_validation():
    config = dm.LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules,
            config.use_dora, config.detach_norm) == (8, 8, 0.0, None, False, True)
    assert dm.LoraConfig(target_modules=["fc2", "fc1"]).target_modules == ("fc1", "fc2")
    assert dm.LoraConfig(target_modules="ALL-Linear").target_modules == "all-linear"
    for kwargs, error in [({"r": 0}, ValueError), ({"r": 2.5}, TypeError),
                          ({"lora_alpha": 0}, ValueError), ({"lora_dropout": 1.0}, ValueError),
                          ({"target_modules": []}, ValueError),
                          ({"target_modules": "fc(1"}, ValueError),
                          ({"target_modules": 3}, TypeError),
                          ({"target_modules": ["fc1", ""]}, TypeError),
                          ({"use_dora": "yes"}, TypeError), ({"detach_norm": 1}, TypeError),
                          ({"bias": "all"}, ValueError),
                          ({"rank_pattern": {"fc1": 0}}, ValueError),
                          ({"rank_pattern": ["fc1"]}, TypeError),
                          ({"alpha_pattern": {"fc(": 2}}, ValueError),
                          ({"alpha_pattern": {"fc1": float("inf")}}, ValueError)]:
        with pytest.raises(error, match=next(iter(kwargs))):
            dm.LoraConfig(**kwargs)


@pytest.mark.interop
def test_lora_config_defaults_are_peft_defaults():
    peft = pytest.importorskip("peft")
    ours, theirs = dm.LoraConfig(), peft.LoraConfig()
    for field in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "bias",
                  "task_type"):
        assert getattr(ours, field) == getattr(theirs, field), field


# --- inject, merge, count ---------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [True, False])
def test_inject_replaces_targets_freezes_the_rest_and_starts_as_the_base_model(use_dora):
    model = toy_model()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = model(x)
    dm.inject_adapters(model, dm.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"],
                                            use_dora=use_dora))
    names = [n for n, _ in dm.adapters.adapter_layers(model)]
    assert names == ["0.fc1", "1.fc1"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_names = {f"{b}.fc1.{k}" for b in "01" for k in ("lora_A", "lora_B")}
    if use_dora:
        expected_names |= {f"{b}.fc1.magnitude" for b in "01"}
    assert trainable == expected_names
    assert torch.allclose(model(x), expected, rtol=0, atol=1e-14)
    count = dm.trainable_parameters(model)
    per_layer = 2 * (6 + 10) + (10 if use_dora else 0)  # r(in+out) (+ out)
    assert count.trainable == 2 * per_layer
    assert count.total == sum(p.numel() for p in toy_model().parameters()) + 2 * per_layer


def test_inject_every_linear_when_no_target_is_given():
    model = dm.inject_adapters(toy_model(), dm.LoraConfig(r=1, use_dora=True))
    assert [n for n, _ in dm.adapters.adapter_layers(model)] == ["0.fc1", "0.fc2", "1.fc1",
                                                                 "1.fc2", "2"]


def test_an_unmatched_target_lists_the_linear_layers_and_changes_nothing():
    model = toy_model()
    before = state_of(model)
    with pytest.raises(ValueError, match=r"\['attn'\] match no layer.*0.fc1"):
        dm.inject_adapters(model, dm.LoraConfig(target_modules=["fc1", "attn"]))
    assert same_state(state_of(model), before)
    assert not dm.adapters.adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_merge_adapters_gives_plain_linears_with_unchanged_outputs():
    model = trained(dm.inject_adapters(toy_model(), dm.LoraConfig(r=3, use_dora=True)))
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = model(x).detach()
    merged = dm.merge_adapters(model)
    assert not dm.adapters.adapter_layers(merged)
    assert sum(isinstance(m, nn.Linear) for m in merged.modules()) == 5
    assert rel_error(merged(x).detach().numpy(), expected.numpy()) < 1e-13


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_a_string_target_is_a_regex_matched_against_the_whole_name():
    model = dm.inject_adapters(toy_model(), dm.LoraConfig(target_modules=r"\d\.fc(1|2)"))
    assert [n for n, _ in dm.adapter_layers(model)] == ["0.fc1", "0.fc2", "1.fc1", "1.fc2"]
    model = dm.inject_adapters(toy_model(), dm.LoraConfig(target_modules=r"1\..*c.*"))
    assert [n for n, _ in dm.adapter_layers(model)] == ["1.fc1", "1.fc2"]
    untouched = toy_model()
    before = state_of(untouched)
    with pytest.raises(ValueError, match=r"\['fc1'\] match no layer"):  # "fc1" != "0.fc1"
        dm.inject_adapters(untouched, dm.LoraConfig(target_modules="fc1"))
    with pytest.raises(ValueError, match=r"0.norm \(LayerNorm\).*cannot be adapted"):
        dm.inject_adapters(untouched, dm.LoraConfig(target_modules=r"0\.(fc1|norm)"))
    with pytest.raises(ValueError, match=r"1.norm \(LayerNorm\)"):
        dm.inject_adapters(untouched, dm.LoraConfig(target_modules=["fc2", "norm"]))
    assert same_state(state_of(untouched), before) and not dm.adapter_layers(untouched)


class WithOutputEmbedding(nn.Module):
    """The transformers convention "all-linear" reads: get_output_embeddings() is the head."""
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


def test_all_linear_leaves_out_only_a_models_output_embedding():
    plain = dm.inject_adapters(toy_model(), dm.LoraConfig(target_modules="all-linear"))
    assert [n for n, _ in dm.adapter_layers(plain)] == linear_names(toy_model())
    model = dm.inject_adapters(WithOutputEmbedding(), dm.LoraConfig(target_modules="all-linear"))
    assert [n for n, _ in dm.adapter_layers(model)] == ["body"]
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, dm.DoRALinear)


PEFT_TARGETS = [["fc1"], ["0.fc2", "2"], r"\d\.fc(1|2)", r"1\..*c.*", "all-linear"]


@pytest.mark.interop
@pytest.mark.parametrize("targets", PEFT_TARGETS, ids=str)
def test_targets_select_what_peft_selects(targets):
    peft = pytest.importorskip("peft")
    ours = dm.get_peft_model(toy_model(), dm.LoraConfig(target_modules=targets))
    theirs = peft.get_peft_model(toy_model(), peft.LoraConfig(target_modules=targets))
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(n for n, _ in dm.adapter_layers(ours)) == peft_names


@pytest.mark.interop
@pytest.mark.parametrize("head, task_type", [("lm_head", None), ("score", "SEQ_CLS")])
def test_all_linear_on_a_transformers_model_is_peft_s(head, task_type):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, pad_token_id=0)
    Model = (transformers.LlamaForCausalLM if task_type is None else
             transformers.LlamaForSequenceClassification)
    ours = dm.get_peft_model(Model(config), dm.LoraConfig(target_modules="all-linear",
                                                          task_type=task_type))
    theirs = peft.get_peft_model(Model(config), peft.LoraConfig(target_modules="all-linear",
                                                                task_type=task_type))
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert len(peft_names) == 7 and not any(head in n for n in peft_names)
    assert isinstance(getattr(ours, head), nn.Linear)
    assert sorted(n for n, _ in dm.adapter_layers(ours)) == peft_names


@pytest.mark.interop
def test_peft_snippet_runs_with_its_import_changed_and_builds_peft_s_model():
    peft = pytest.importorskip("peft")
    models = []
    for LoraConfig, get_peft_model in [(dm.LoraConfig, dm.get_peft_model),
                                       (peft.LoraConfig, peft.get_peft_model)]:
        model = toy_model()
        config = LoraConfig(r=4, target_modules=["fc1", "fc2"], bias="none", use_dora=True)
        models.append(get_peft_model(model, config))
    ours, theirs = models
    dm.set_peft_model_state_dict(ours, trained_peft(theirs))
    x = torch.randn(5, 6, dtype=torch.float64)
    assert rel_error(ours(x).detach().numpy(), theirs(x).detach().numpy()) < 1e-13
    assert tuple(dm.trainable_parameters(ours)) == theirs.get_nb_trainable_parameters()


def trained_peft(peft_model, seed=2):
    """Move a PEFT model's adapters away from their init; returns PEFT's adapter state."""
    import peft
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return peft.get_peft_model_state_dict(peft_model)


@pytest.mark.interop
def test_print_trainable_parameters_prints_what_peft_prints(capsys):
    peft = pytest.importorskip("peft")
    dm.print_trainable_parameters(dm.get_peft_model(toy_model(), dm.LoraConfig(use_dora=True)))
    ours = capsys.readouterr().out
    peft.get_peft_model(toy_model(), peft.LoraConfig(
        use_dora=True, target_modules="all-linear")).print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours.splitlines()[0] == theirs.strip() and ours.startswith("trainable params: ")


def test_peft_names_are_ours():
    assert dm.get_peft_model is dm.inject_adapters
    assert dm.merge_and_unload is dm.merge_adapters
    assert dm.get_peft_model_state_dict is dm.to_peft_state_dict
    assert dm.set_peft_model_state_dict is dm.from_peft_state_dict


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = self.b = nn.Linear(4, 4).double()
        self.c = nn.Linear(4, 4).double()

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("targets", [None, ["a"], ["b"]])
def test_a_module_under_several_names_is_adapted_and_merged_once(targets):
    model = trained(dm.inject_adapters(Tied(), dm.LoraConfig(r=2, target_modules=targets,
                                                             use_dora=True)))
    assert isinstance(model.a, dm.DoRALinear) and model.a is model.b
    assert [n for n, _ in dm.adapter_layers(model)][0] == "a"
    assert dm.trainable_parameters(model).trainable == (2 * (2 * 8 + 4) if targets is None
                                                        else 2 * 8 + 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = model(x).detach()
    dm.merge_adapters(model)
    assert type(model.a) is nn.Linear and model.a is model.b and not dm.adapter_layers(model)
    assert rel_error(model(x).detach().numpy(), expected.numpy()) < 1e-13


def test_merged_layers_keep_the_base_weights_requires_grad():
    model = dm.merge_adapters(trained(dm.inject_adapters(toy_model(), dm.LoraConfig(
        use_dora=True, target_modules=["fc1"]))))
    assert not any(p.requires_grad for p in model.parameters())  # frozen stays frozen
    layer = dm.DoRALinear(3, 2, r=1, lora_alpha=1)
    layer.weight.requires_grad_(True)
    linear = layer.to_linear()
    assert linear.weight.requires_grad and not linear.bias.requires_grad


def test_a_merged_layer_in_training_warns_once_that_its_adapters_get_no_gradient():
    import warnings
    layer = dm.DoRALinear(3, 2, r=1, lora_alpha=1)
    layer.merge()
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.eval()(x)  # eval: no warning
        with torch.no_grad():
            layer.train()(x)  # no gradient wanted: no warning
        assert not caught
        layer.train()(x)
        layer(x)
    assert len(caught) == 1 and "merged" in str(caught[0].message)
    assert "unmerge()" in str(caught[0].message)


@pytest.mark.parametrize("use_dora", [True, False])
def test_reset_magnitude_after_loading_pretrained_weights(use_dora):
    pretrained = toy_model(seed=0)
    config = dm.LoraConfig(r=2, use_dora=use_dora)
    model = dm.inject_adapters(toy_model(seed=7), config)  # adapters on other weights
    weights = {k: v for k, v in pretrained.state_dict().items() if "fc" in k or k.startswith("2")}
    state = model.state_dict()
    state.update(weights)
    model.load_state_dict(state)
    x = torch.randn(4, 6, dtype=torch.float64)
    stale = (model(x) - pretrained(x)).abs().max().item()
    assert stale > 1e-3 if use_dora else stale < 1e-14  # the magnitude is still ‖old W0‖_c
    assert dm.reset_magnitude(model) is model
    assert rel_error(model(x).detach().numpy(), pretrained(x).detach().numpy()) < 1e-14
    fresh = dm.inject_adapters(toy_model(seed=0), config)
    assert same_state(dm.adapter_state_dict(model).keys(), dm.adapter_state_dict(fresh).keys())
    for key, value in dm.adapter_state_dict(fresh).items():
        if key.endswith("magnitude"):
            assert torch.allclose(dm.adapter_state_dict(model)[key], value, rtol=1e-15, atol=0)
    model[0].fc1.merge()
    with pytest.raises(ValueError, match=r"\['0.fc1'\] are merged"):
        dm.reset_magnitude(model)


# --- saving -----------------------------------------------------------------------------------

def test_adapter_state_dict_round_trip():
    config = dm.LoraConfig(r=2, target_modules=["fc2"], use_dora=True)
    source = trained(dm.inject_adapters(toy_model(), config))
    state = dm.adapter_state_dict(source)
    assert sorted(state) == [f"{b}.fc2.{k}" for b in "01" for k in ("lora_A", "lora_B",
                                                                     "magnitude")]
    target = dm.inject_adapters(toy_model(), config)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert not torch.equal(target(x), source(x))
    buffer = io.BytesIO()
    torch.save(state, buffer)  # through a file, as a user saves it
    buffer.seek(0)
    dm.load_adapter_state_dict(target, torch.load(buffer))
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape", "merged"])
def test_loading_a_mismatched_adapter_raises_and_changes_nothing(change):
    config = dm.LoraConfig(r=2, target_modules=["fc2"], use_dora=True)
    state = dm.adapter_state_dict(trained(dm.inject_adapters(toy_model(), config)))
    target = dm.inject_adapters(toy_model(), config)
    if change == "missing":
        state.pop("1.fc2.magnitude")
    elif change == "unexpected":
        state["2.lora_A"] = torch.zeros(2, 6)
    elif change == "shape":
        state["0.fc2.lora_A"] = torch.zeros(3, 10)
    else:
        target[0].fc2.merge()
    before = state_of(target)
    with pytest.raises(ValueError, match={"missing": "missing keys .'1.fc2.magnitude'",
                                          "unexpected": "unexpected keys .'2.lora_A'",
                                          "shape": r"0.fc2.lora_A expected shape \(2, 10\)",
                                          "merged": "merged"}[change]):
        dm.load_adapter_state_dict(target, state)
    assert same_state(state_of(target), before)


def test_peft_keys_round_trip():
    config = dm.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["fc1"])
    source = trained(dm.inject_adapters(toy_model(), config))
    state = dm.to_peft_state_dict(source)
    assert sorted(state) == sorted(f"base_model.model.{b}.fc1.{k}" for b in "01" for k in
                                   ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    target = dm.inject_adapters(toy_model(), config)
    dm.from_peft_state_dict(target, state)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(target(x), source(x))
    before = state_of(target)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing keys"):
        dm.from_peft_state_dict(target, state)
    assert same_state(state_of(target), before)


@pytest.mark.interop
@pytest.mark.parametrize("use_dora", [True, False])
def test_adapters_load_into_peft_and_back_with_the_same_outputs(use_dora):
    peft = pytest.importorskip("peft")
    config = dm.LoraConfig(r=2, lora_alpha=6, use_dora=use_dora, target_modules=["fc1", "fc2"])
    ours = trained(dm.inject_adapters(toy_model(), config))
    peft_model = peft.get_peft_model(toy_model(), peft.LoraConfig(
        r=2, lora_alpha=6, use_dora=use_dora, target_modules=["fc1", "fc2"]))
    result = peft.set_peft_model_state_dict(peft_model, dm.to_peft_state_dict(ours))
    assert not result.unexpected_keys
    x = torch.randn(5, 6, dtype=torch.float64)
    assert rel_error(peft_model(x).detach().numpy(), ours(x).detach().numpy()) < 1e-13
    back = dm.inject_adapters(toy_model(), config)
    dm.from_peft_state_dict(back, peft.get_peft_model_state_dict(peft_model))
    assert torch.equal(back(x), ours(x))


# --- the paper's analysis ---------------------------------------------------------------------

def test_magnitude_and_direction_changes_eq3_eq4():
    torch.manual_seed(0)
    W0 = torch.randn(5, 4, dtype=torch.float64)
    norms = torch.linalg.vector_norm(W0, dim=1)
    # scaling rows changes magnitude only: ΔM = mean |(k-1)| ‖w0‖, ΔD = 0
    k = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.5], dtype=torch.float64)
    delta_m, delta_d = dm.magnitude_direction_change(W0, k[:, None] * W0)
    assert delta_m == pytest.approx(float(((k - 1).abs() * norms).mean()), rel=1e-14)
    assert delta_d == pytest.approx(0.0, abs=1e-15)
    # swapping two coordinates keeps every norm: ΔM = 0, ΔD = mean(1 - cos)
    W = W0[:, [1, 0, 2, 3]]
    cos = (W * W0).sum(1) / norms**2
    delta_m, delta_d = dm.magnitude_direction_change(W0, W)
    assert delta_m == pytest.approx(0.0, abs=1e-14)
    assert delta_d == pytest.approx(float((1 - cos).mean()), rel=1e-12)


# --- distributed and compiled -----------------------------------------------------------------

def _ddp_worker(rank, world_size, port, x, y, path):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = dm.inject_adapters(toy_model(), dm.LoraConfig(r=2, use_dora=True))
    trained(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    nn.functional.mse_loss(ddp(x[shard]), y[shard]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, path)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads can still hold tensors then, and tearing
    # them down aborts the process now and then (about 1 run in 15 here) after the work is done.
    os._exit(0)


def test_distributed_data_parallel_gradients_equal_full_batch_gradients(tmp_path):
    """Two gloo processes, half the batch each: DDP's averaged gradients are the full batch's."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.manual_seed(5)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    path = tmp_path / "grads.pt"
    mp.start_processes(_ddp_worker, args=(2, port, x, y, str(path)), nprocs=2,
                       start_method="spawn")
    distributed = torch.load(path)
    model = trained(dm.inject_adapters(toy_model(), dm.LoraConfig(r=2, use_dora=True)))
    nn.functional.mse_loss(model(x), y).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert distributed.keys() == single.keys() and len(single) == 15
    for name in single:
        assert rel_error(distributed[name].numpy(), single[name].numpy()) < 1e-13, name


def compiled_matches_eager(backend):
    model = trained(dm.inject_adapters(toy_model(), dm.LoraConfig(r=2, use_dora=True)))
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    x = torch.randn(7, 6, dtype=torch.float64)
    outputs = []
    for m in (model, compiled):
        y = m(x)
        y.square().sum().backward()
        outputs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()
                                     if p.requires_grad}))
    (y_eager, g_eager), (y_compiled, g_compiled) = outputs
    assert rel_error(y_compiled.numpy(), y_eager.numpy()) < 1e-12
    for name, grad in g_eager.items():
        name_compiled = name if name in g_compiled else f"_orig_mod.{name}"
        assert rel_error(g_compiled[name_compiled].numpy(), grad.numpy()) < 1e-12, name


def test_torch_compile_matches_eager_aot_eager():
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_matches_eager_inductor():
    compiled_matches_eager("inductor")


# --- PEFT's defaults, modules to save, tied weights, clear refusals ---------------------------

class LikeTransformers(nn.Module):
    """A model built as transformers builds one: config.model_type picks PEFT's default
    targets (here without transformers installed)."""
    def __init__(self, model_type):
        super().__init__()
        self.config = type("Config", (), {"model_type": model_type})()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({name: nn.Linear(4, 4) for name in
                                                   ("q_proj", "k_proj", "v_proj", "o_proj")})
                                    for _ in range(2))
        self.lm_head = nn.Linear(4, 8)


def test_target_modules_none_on_a_transformers_model_adapts_peft_s_defaults():
    model = dm.get_peft_model(LikeTransformers("llama"), dm.LoraConfig(use_dora=True))
    assert [n for n, _ in dm.adapter_layers(model)] == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    untouched = LikeTransformers("whisper")  # PEFT has no default for it: it asks for targets
    before = state_of(untouched)
    with pytest.raises(ValueError, match="model type 'whisper'.*please specify target_modules"):
        dm.get_peft_model(untouched, dm.LoraConfig())
    assert same_state(state_of(untouched), before) and not dm.adapter_layers(untouched)
    assert all(p.requires_grad for p in untouched.parameters())
    named = dm.get_peft_model(LikeTransformers("whisper"), dm.LoraConfig(target_modules=["o_proj"]))
    assert [n for n, _ in dm.adapter_layers(named)] == ["layers.0.o_proj", "layers.1.o_proj"]


class TiedLanguageModel(nn.Module):
    """A plain torch model whose output layer shares its weight with the input embedding."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body = nn.Embedding(10, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_a_tied_output_layer_is_adapted_only_when_named_and_then_a_warning_says_so():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = dm.get_peft_model(TiedLanguageModel(), dm.LoraConfig(use_dora=True))
    assert [n for n, _ in dm.adapter_layers(model)] == ["body"]
    assert model.head.weight is model.embed.weight  # the tie holds
    with pytest.warns(UserWarning, match=r"head: its weight is tied to \['embed'\].*breaks"):
        named = dm.get_peft_model(TiedLanguageModel(), dm.LoraConfig(target_modules=["head"]))
    assert isinstance(named.head, dm.DoRALinear)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(self.encoder(x))


@pytest.mark.parametrize("how", ["modules_to_save", "task_type"])
def test_modules_to_save_are_trained_in_full_and_never_adapted(how):
    config = (dm.LoraConfig(r=2, use_dora=True, modules_to_save=["classifier"]) if
              how == "modules_to_save" else dm.LoraConfig(r=2, use_dora=True, task_type="SEQ_CLS"))
    model = dm.get_peft_model(Classifier().double(), config)
    assert [n for n, _ in dm.adapter_layers(model)] == ["encoder.0", "encoder.2"]
    assert type(model.classifier) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith("encoder") and n.endswith(("weight", "bias")) for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    head = model.classifier.weight.detach().clone()
    model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()  # trains, no error
    optimizer.step()
    assert not torch.equal(model.classifier.weight, head)
    merged = dm.merge_and_unload(model)
    assert torch.equal(merged.classifier.weight.detach(), model.classifier.weight.detach())
    with pytest.raises(ValueError, match=r"modules_to_save: \['clasifier'\] match no module"):
        dm.get_peft_model(Classifier(), dm.LoraConfig(modules_to_save=["clasifier"]))
    with pytest.raises(TypeError, match="modules_to_save: expected a list"):
        dm.LoraConfig(modules_to_save="classifier")


def test_print_trainable_parameters_then_names_the_adapted_layers(capsys):
    dm.print_trainable_parameters(dm.get_peft_model(Classifier(), dm.LoraConfig(
        target_modules=["0", "2"], task_type="SEQ_CLS")))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trainable params: ")
    assert lines[1] == "adapted layers (2): encoder.0, encoder.2; trained in full: classifier"
    dm.print_trainable_parameters(dm.get_peft_model(toy_model(), dm.LoraConfig(
        target_modules=["fc1", "fc2"])))
    assert capsys.readouterr().out.splitlines()[1] == "adapted layers (4): fc1 (2), fc2 (2)"


def test_an_embedding_with_max_norm_is_refused_and_the_model_is_unchanged():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"cannot adapt 0 \(Embedding\): max_norm: expected "
                                         r"None, got 1.0.*renormalizes"):
        dm.get_peft_model(model, dm.LoraConfig(target_modules=["0", "1"]))
    assert same_state(state_of(model), before) and type(model[1]) is nn.Linear


@pytest.mark.parametrize("lazy", [nn.LazyLinear(3), nn.LazyConv2d(3, 1)], ids=["linear", "conv"])
def test_an_unmaterialized_lazy_layer_asks_to_be_run_once_first(lazy):
    model = nn.Sequential(lazy)
    with pytest.raises(ValueError, match=r"\['0 \(Lazy.*not materialized yet.*run the model once"):
        dm.get_peft_model(model, dm.LoraConfig(target_modules=["0"]))
    assert model[0] is lazy


def test_merge_adapters_names_the_layer_it_cannot_merge_and_changes_nothing():
    model = dm.get_peft_model(toy_model().half(), dm.LoraConfig(use_dora=True))
    with torch.no_grad():
        model[1].fc2.magnitude.fill_(1e6)  # W' overflows float16
    with pytest.raises(ValueError, match=r"merge_adapters: layer 1.fc2: .*NaN or inf in rows"):
        dm.merge_adapters(model)
    assert len(dm.adapter_layers(model)) == 5


def test_r_is_read_only_after_construction():
    layer = dm.DoRALinear(4, 3, r=2, lora_alpha=4)
    with pytest.raises(AttributeError, match="r: is fixed when the layer is built.*got r = 4"):
        layer.r = 4
    assert (layer.r, layer.scaling, tuple(layer.lora_A.shape)) == (2, 2.0, (2, 4))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_an_init_that_rewrites_the_base_weight_is_refused(init):
    with pytest.raises(ValueError, match=f"init_lora_weights: '{init}' is an init that PEFT "
                                         f"computes from the base weight and then subtracts"):
        dm.LoraConfig(init_lora_weights=init)
