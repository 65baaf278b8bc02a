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
