"""DoRALinear: initialization, LoRA and DoRA modes, dropout, merge/unmerge, eval paths, round
trips."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from dora_minimal import DoRALinear, reference
from helpers import rel_error
from test_functional import DEVICES


def trained_layer(use_dora=True, dtype=torch.float64, device="cpu", in_features=6,
                  out_features=5, r=3, bias=True, seed=0, **kwargs):
    """A layer whose adapter has moved away from its init (B != 0, m != ‖W0‖_c)."""
    torch.manual_seed(seed)
    layer = DoRALinear(in_features, out_features, r, lora_alpha=2 * r, bias=bias,
                       use_dora=use_dora, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        if use_dora:
            layer.magnitude.mul_(torch.rand(out_features, device=device) + 0.5)
    return layer


def as_numpy(layer):
    """The layer's arrays for dora_minimal.reference."""
    get = lambda t: None if t is None else t.detach().double().cpu().numpy()  # noqa: E731
    return dict(W0=get(layer.weight), A=get(layer.lora_A), B=get(layer.lora_B),
                m=get(layer.magnitude), bias=get(layer.bias), scaling=layer.scaling)


# --- parameters and init ----------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [True, False])
def test_parameters_names_shapes_and_init(use_dora):
    layer = DoRALinear(7, 4, r=3, lora_alpha=6, use_dora=use_dora)
    names = {n: (tuple(p.shape), p.requires_grad) for n, p in layer.named_parameters()}
    expected = {"weight": ((4, 7), False), "bias": ((4,), False), "lora_A": ((3, 7), True),
                "lora_B": ((4, 3), True)}
    if use_dora:
        expected["magnitude"] = ((4,), True)
    assert names == expected
    assert layer.scaling == 2.0
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(7)  # Kaiming-uniform, a = sqrt(5)
    assert layer.lora_A.std() > 0.3 / math.sqrt(7)
    if use_dora:
        torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(layer.weight, dim=1))
    text = repr(layer)
    for part in ["in_features=7", "out_features=4", "r=3", "lora_alpha=6",
                 f"use_dora={use_dora}", "merged=False"]:
        assert part in text


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [True, False])
def test_at_init_the_layer_equals_the_wrapped_linear(device, dtype, use_dora):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, device=device, dtype=dtype)
    layer = DoRALinear.from_linear(linear, r=4, lora_alpha=8, use_dora=use_dora)
    assert layer.weight.device == linear.weight.device and layer.weight.dtype == dtype
    x = torch.randn(3, 5, 16, device=device, dtype=dtype)
    # the bias may be added in another order than nn.Linear's: a few units of round-off
    tolerance = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for mode in (layer.train, layer.eval):
        mode()
        y, expected = layer(x).detach().double().cpu(), linear(x).detach().double().cpu()
        assert rel_error(y, expected) <= tolerance


# --- forward: LoRA, DoRA, dropout -------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_dora_layer_equals_the_reference_forward(training):
    layer = trained_layer().train(training)
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    a = as_numpy(layer)
    expected = reference.forward(x.numpy(), a["W0"], a["A"], a["B"], a["m"], a["scaling"],
                                 a["bias"])
    with torch.no_grad():
        assert rel_error(layer(x).numpy(), expected) < 1e-13
    assert rel_error(layer(x).detach().numpy(), expected) < 1e-13


def test_lora_layer_is_x_W_plus_s_x_A_B_plus_b():
    layer = trained_layer(use_dora=False)
    x = torch.randn(7, 6, dtype=torch.float64)
    W, A, B, b, s = layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scaling
    expected = x @ W.T + s * (x @ A.T) @ B.T + b
    assert rel_error(layer(x).detach().numpy(), expected.detach().numpy()) < 1e-14


@pytest.mark.parametrize("use_dora", [True, False])
def test_dropout_acts_on_the_adapter_branch_only(use_dora):
    """y = c ⊙ (x W0^T + s·drop(x) A^T B^T) + b; in eval mode there is no dropout."""
    layer = trained_layer(use_dora=use_dora, lora_dropout=0.5)
    x = torch.randn(50, 6, dtype=torch.float64)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    W0, A, B, b, s = layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scaling
    y0 = x @ W0.T + s * (dropped @ A.T) @ B.T
    c = layer.magnitude / torch.linalg.vector_norm(W0 + s * B @ A, dim=1) if use_dora else 1
    assert rel_error(y.detach().numpy(), (c * y0 + b).detach().numpy()) < 1e-13
    layer.eval()
    assert rel_error(layer(x).detach().numpy(), layer.to_linear()(x).detach().numpy()) < 1e-13


def test_only_the_adapter_gets_gradients():
    layer = trained_layer()
    layer(torch.randn(3, 6, dtype=torch.float64)).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (layer.lora_A, layer.lora_B, layer.magnitude))


# --- merge, unmerge, to_linear ----------------------------------------------------------------

@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("use_dora", [True, False])
def test_merge_unmerge_round_trip_and_merged_equals_unmerged(dtype, tolerance, use_dora):
    layer = trained_layer(use_dora=use_dora, dtype=dtype)
    W0 = layer.weight.detach().clone()
    x = torch.randn(5, 6, dtype=dtype)
    y = layer(x).detach()
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    with torch.no_grad():  # (a merged layer warns when it is trained)
        assert rel_error(layer(x).numpy(), y.numpy()) <= tolerance
    a = as_numpy(layer)
    if use_dora:
        expected = reference.merge(W0.double().numpy(), a["A"], a["B"], a["m"], a["scaling"])
        assert rel_error(layer.weight.detach().numpy(), expected) <= tolerance
    layer.unmerge()
    assert not layer.merged
    assert rel_error(layer.weight.detach().numpy(), W0.numpy()) <= tolerance
    assert rel_error(layer(x).detach().numpy(), y.numpy()) <= tolerance


def test_merge_twice_or_unmerge_unmerged_raises_and_changes_nothing():
    layer = trained_layer()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    W = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, W) and layer.merged


def test_to_linear_returns_a_plain_linear_with_the_merged_weight():
    layer = trained_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and not layer.merged
    assert rel_error(linear(x).detach().numpy(), layer(x).detach().numpy()) < 1e-13
    layer.merge()
    assert rel_error(layer.to_linear().weight.detach().numpy(), linear.weight.detach().numpy()) \
        < 1e-15


# --- eval paths (no cache: see tests/test_workflows.py for every way a parameter changes) -----

@pytest.mark.parametrize("tokens", [1, 100])
def test_eval_paths_with_few_and_many_tokens_agree_with_training_path(tokens):
    layer = trained_layer()
    x = torch.randn(tokens, 6, dtype=torch.float64)
    y_train = layer(x).detach()
    with torch.no_grad():
        y_eval = layer.eval()(x)
    assert rel_error(y_eval.numpy(), y_train.numpy()) < 1e-13


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [4, 300])
def test_bf16_eval_paths_within_1e_2_of_float64(device, tokens):
    layer = trained_layer(dtype=torch.bfloat16, device=device, in_features=64, out_features=32,
                          r=4).eval()
    x = torch.randn(tokens, 64, device=device, dtype=torch.bfloat16)
    exact = copy.deepcopy(layer).double()
    with torch.no_grad():
        y, expected = layer(x), exact(x.double())
    assert y.dtype == torch.bfloat16
    assert rel_error(y.double().cpu().numpy(), expected.cpu().numpy()) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dora", [True, False])
def test_under_autocast_the_layer_computes_in_bf16_like_nn_linear(device, use_dora):
    """torch.autocast: inputs arrive in bf16 from the layer before; matmuls run in bf16, the
    parameters (and their gradients) stay float32, results within 1e-2 of float64."""
    torch.manual_seed(0)
    layer = trained_layer(use_dora=use_dora, dtype=torch.float32, device=device,
                          in_features=64, out_features=48, r=4)
    model = nn.Sequential(nn.Linear(32, 64, device=device), layer)
    exact = copy.deepcopy(model).double()
    x = torch.randn(40, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    exact(x.double()).square().sum().backward()
    assert rel_error(y.double().detach().cpu().numpy(),
                     exact(x.double()).detach().cpu().numpy()) <= 1e-2
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == p.dtype == torch.float32, name
            expected = dict(exact[1].named_parameters())[name].grad
            assert rel_error(p.grad.double().cpu().numpy(), expected.cpu().numpy()) <= 1e-2, name
    for mode in ("eval", "merged"):
        layer.eval()
        if mode == "merged":
            layer.merge()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        assert rel_error(y.double().cpu().numpy(), exact(x.double()).detach().cpu().numpy()) \
            <= 1e-2, mode


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("merged", [False, True])
@torch.no_grad()  # (a merged layer warns when it is trained)
def test_state_dict_deepcopy_pickle_and_torch_save_round_trips(merged):
    layer = trained_layer()
    if merged:
        layer.merge()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = layer(x).detach()
    fresh = DoRALinear(6, 5, r=3, lora_alpha=6, dtype=torch.float64)
    fresh.load_state_dict(layer.state_dict())
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [fresh, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)),
              torch.load(buffer, weights_only=False)]
    for other in copies:
        assert other.merged == merged
        assert torch.equal(other(x).detach(), y)
        if merged:
            other.unmerge()
            layer_copy = copy.deepcopy(layer)
            layer_copy.unmerge()
            assert torch.equal(other.weight, layer_copy.weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_to_dtype_and_device_and_back(device, use_dora, bias):
    layer = trained_layer(use_dora=use_dora, bias=bias)
    x = torch.randn(4, 6, dtype=torch.float64)
    y = layer(x).detach()
    moved = copy.deepcopy(layer).to(device=device, dtype=torch.bfloat16)
    assert moved.weight.dtype == torch.bfloat16
    assert moved.magnitude is None or moved.magnitude.dtype == torch.float32
    assert moved.weight.device.type == device
    assert rel_error(moved(x.to(device, torch.bfloat16)).detach().double().cpu().numpy(),
                     y.numpy()) < 2e-2
    back = copy.deepcopy(layer).to(device).to("cpu")
    assert torch.equal(back(x).detach(), y)
    # the magnitude keeps full precision through a half-precision round trip
    there_and_back = copy.deepcopy(layer).half().double()
    if use_dora:  # float64 -> float32 (not float16) -> float64
        assert torch.equal(there_and_back.magnitude, layer.magnitude.float().double())


def test_train_eval_switching_changes_nothing():
    layer = trained_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    outputs = []
    for mode in [True, False, True, False]:
        layer.train(mode)
        with torch.no_grad():
            outputs.append(layer(x))
    assert all(rel_error(o.numpy(), outputs[0].numpy()) < 1e-14 for o in outputs)


# --- load_state_dict: all or nothing, per layer ------------------------------------------------

def layer_state(layer):
    """Every tensor and flag of a layer, copied: what a failed load must leave as it was."""
    tensors = {n: p.detach().clone() for n, p in layer.named_parameters()}
    norm = layer._merged_norm
    return tensors, layer.merged, None if norm is None else norm.clone(), layer._merged_adapter


def assert_unchanged(layer, before):
    tensors, merged, norm, snapshot = layer_state(layer)
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[n], before[0][n]) for n in tensors), "a tensor was written"
    assert merged == before[1] and (norm is None) == (before[2] is None)
    assert norm is None or torch.equal(norm, before[2])
    assert snapshot is before[3]


def merged_pair(use_dora=True, kind="linear"):
    """(a merged layer, another trained layer of its shape, an input); the merged layer's W0
    is kept as layer.W0_before_merge."""
    if kind == "linear":
        layer, other = trained_layer(use_dora=use_dora), trained_layer(use_dora=use_dora, seed=5)
        x = torch.randn(4, 6, dtype=torch.float64)
    else:
        from test_layer_kinds import make
        _, layer, x = make(kind, use_dora=use_dora)
        _, other, _ = make(kind, use_dora=use_dora, seed=5)
    layer.W0_before_merge = layer.weight.detach().clone()
    layer.merge()
    return layer, other, x


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("use_dora", [True, False])
@pytest.mark.parametrize("assign", [False, True])
@torch.no_grad()
def test_a_malformed_extra_state_into_a_merged_layer_changes_nothing(use_dora, kind, assign):
    layer, other, x = merged_pair(use_dora, kind)
    y, before = layer(x), layer_state(layer)
    for extra in (torch.tensor([0.0, 1.0]), torch.tensor([1.0, float("nan")] + [1.0] * 99),
                  {"merged": True, "merged_norm": None} if use_dora else {"merged": 1}):
        with pytest.raises(ValueError, match="_extra_state"):
            layer.load_state_dict({**other.state_dict(), "_extra_state": extra}, assign=assign)
        assert_unchanged(layer, before)
        assert torch.equal(layer(x), y)
    layer.unmerge()  # still the merged state it was: unmerge() restores W0
    assert rel_error(layer.weight, layer.W0_before_merge) < 1e-13


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding", "gpt2_conv1d"])
@pytest.mark.parametrize("use_dora", [True, False])
@torch.no_grad()
def test_a_state_dict_without_extra_state_into_a_merged_layer_loads_an_unmerged_layer(
        use_dora, kind):
    layer, other, x = merged_pair(use_dora, kind)
    state = {k: v for k, v in other.state_dict().items() if k != "_extra_state"}
    layer.load_state_dict(state)  # strict: a state dict without extra state is an unmerged one
    assert not layer.merged and layer._merged_norm is None
    assert torch.equal(layer(x), other(x))
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()  # and merges as the loaded adapter
    assert torch.equal(layer.weight, other.to_base().weight)


@torch.no_grad()
def test_the_old_dict_extra_state_loads_when_complete_and_is_refused_when_not():
    layer, other, x = merged_pair()
    source = copy.deepcopy(other)
    source.merge()
    norm = source._merged_norm
    state = {**source.state_dict(), "_extra_state": {"merged": True, "merged_norm": norm}}
    layer.load_state_dict(state)  # as earlier versions saved it
    assert layer.merged and torch.equal(layer(x), source(x))
    layer.unmerge()
    assert rel_error(layer.weight, other.weight) < 1e-13
    assert rel_error(layer(x), other(x)) < 1e-13
    layer.merge()  # a merged DoRA layer without its norms could not unmerge: refused at load
    before = layer_state(layer)
    with pytest.raises(ValueError, match=r"'merged_norm': a tensor of the 5 norms"):
        layer.load_state_dict({**state, "_extra_state": {"merged": True, "merged_norm": None}})
    assert_unchanged(layer, before)


@pytest.mark.parametrize("assign", [False, True])
@torch.no_grad()
def test_a_shape_mismatch_in_one_tensor_writes_none_of_the_layer(assign):
    layer, other, x = merged_pair()
    y, before = layer(x), layer_state(layer)
    state = {**other.state_dict(), "lora_B": torch.zeros(5, 4, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=r"size mismatch for lora_B.*none of its tensors"):
        layer.load_state_dict(state, assign=assign)
    assert_unchanged(layer, before)
    assert torch.equal(layer(x), y)
    with pytest.raises(RuntimeError, match=r"weight: expected a tensor, got str"):
        layer.load_state_dict({**other.state_dict(), "weight": "W0"})
    assert_unchanged(layer, before)


@torch.no_grad()
def test_without_the_weight_the_merged_flag_cannot_change():
    layer, other, x = merged_pair()
    before = layer_state(layer)
    adapter_only = {k: other.state_dict()[k] for k in ("lora_A", "lora_B", "magnitude")}
    with pytest.raises(ValueError, match=r"no weight, so the layer would keep its merged weight"):
        layer.load_state_dict(adapter_only, strict=False)  # W' would be taken for W0
    assert_unchanged(layer, before)
    with pytest.raises(ValueError, match=r"holds a merged state"):  # W0 taken for W'
        other.load_state_dict({"_extra_state": layer.get_extra_state()}, strict=False)
    with pytest.raises(ValueError, match=r"needs the adapter it was merged with"):
        other.load_state_dict({"weight": layer.weight, "_extra_state": layer.get_extra_state()},
                              strict=False)
    # the same merged state without the weight: the layer keeps what it has, unmerge() included
    layer.load_state_dict({"bias": layer.bias + 0, "_extra_state": layer.get_extra_state()},
                          strict=False)
    assert_unchanged(layer, before)
    layer.unmerge()
    layer.load_state_dict(adapter_only, strict=False)  # unmerged into unmerged: loads
    assert all(torch.equal(getattr(layer, k), v) for k, v in adapter_only.items())


@torch.no_grad()
def test_in_a_whole_model_a_failing_layer_keeps_its_state_and_torch_loads_the_others():
    model = nn.Sequential(trained_layer(), nn.Tanh(), trained_layer(seed=1, in_features=5))
    source = nn.Sequential(trained_layer(seed=2), nn.Tanh(),
                           trained_layer(seed=3, in_features=5))
    model[2].merge()
    before = layer_state(model[2])
    with pytest.raises(ValueError, match="_extra_state"):  # raised at once: the walk stops
        model.load_state_dict({**source.state_dict(), "2._extra_state": torch.tensor([0., 1.])})
    assert torch.equal(model[0].lora_B, source[0].lora_B)  # loaded before the bad layer
    assert_unchanged(model[2], before)
    state = {**source.state_dict(), "0.lora_A": torch.zeros(1)}
    before = layer_state(model[0])
    with pytest.raises(RuntimeError, match=r"size mismatch for 0.lora_A"):  # at the end
        model.load_state_dict(state)
    assert_unchanged(model[0], before)
    assert not model[2].merged and torch.equal(model[2].lora_B, source[2].lora_B)
