"""The layer in the workflows of real training: every way a parameter can change, precision
under cancellation, torch.func, double backward, torch.compile, torch.export, the meta device and
FSDP2. Each expected value comes from a freshly built layer or from plain autograd on the textbook
formula in float64."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torch.func import functional_call, grad, jacrev, vmap

import dora_minimal as dm
from dora_minimal import DoRALinear, dora_linear
from dora_minimal.core import adapted_row_norm
from helpers import rel_error
from test_functional import textbook_dora


def trained_layer(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = DoRALinear(6, 5, r=3, lora_alpha=6, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(torch.rand(5) + 0.5)
    return layer


def outputs(layer, x):
    """(training output, eval output without gradients): the two ways a layer computes."""
    y_train = layer.train()(x).detach()
    with torch.no_grad():
        y_eval = layer.eval()(x)
    layer.train()
    return y_train, y_eval


def fresh_copy(layer):
    """A new layer built from nothing but the state of `layer`."""
    fresh = DoRALinear(6, 5, r=3, lora_alpha=6, dtype=layer.weight.dtype,
                       detach_norm=layer.detach_norm)
    fresh.load_state_dict(layer.state_dict())
    fresh.scaling = layer.scaling
    return fresh


def optimizer_step(make_optimizer):
    def mutate(layer, x):
        optimizer = make_optimizer([p for p in layer.parameters() if p.requires_grad])
        layer(x).square().sum().backward()
        optimizer.step()
    return mutate


def load(assign):
    def mutate(layer, x):
        layer.load_state_dict(trained_layer(seed=7).state_dict(), assign=assign)
    return mutate


def swap(layer, x):
    torch.utils.swap_tensors(layer.lora_A, nn.Parameter(torch.randn_like(layer.lora_A)))


def to_float_and_back(layer, x):
    layer.float()
    with torch.no_grad():
        layer.lora_B.add_(0.1)
    layer.double()


MUTATIONS = {
    "AdamW fused": optimizer_step(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)),
    "AdamW foreach": optimizer_step(lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True)),
    "SGD for-loop": optimizer_step(lambda p: torch.optim.SGD(p, lr=0.1, foreach=False)),
    "weight.data.copy_": lambda layer, x: layer.weight.data.copy_(torch.randn(5, 6)),
    "lora_B.data.copy_": lambda layer, x: layer.lora_B.data.copy_(torch.randn(5, 3)),
    "magnitude.data.mul_": lambda layer, x: layer.magnitude.data.mul_(2),
    "load_state_dict": load(assign=False),
    "load_state_dict(assign=True)": load(assign=True),
    "swap_tensors": swap,
    ".float() and .double()": to_float_and_back,
    "scaling": lambda layer, x: setattr(layer, "scaling", 3.7),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_no_stale_value_after_any_change_of_the_parameters(mutation):
    """After each way a parameter can change, the layer computes what a layer freshly built from
    its state computes, in training and in eval mode (both used once before the change)."""
    layer = trained_layer()
    x = torch.randn(8, 6, dtype=torch.float64)
    before = outputs(layer, x)
    MUTATIONS[mutation](layer, x)
    after, expected = outputs(layer, x), outputs(fresh_copy(layer), x)
    assert not torch.allclose(after[0], before[0])  # the change did change the output
    for got, want in zip(after, expected):
        assert rel_error(got.numpy(), want.numpy()) < 1e-14


# --- precision under cancellation ---------------------------------------------------------------

def cancelling_problem(seed, dtype, smallest, out_features=6, in_features=8, r=4, tokens=5):
    """W0 = C A + (a part of size ε·‖C A‖ per row) and B = -C/s: each row of V' = W0 + s·B A is
    ε times W0's row, with ε between `smallest` and 1 (log-uniform, one per row)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    s = 2.0
    A, C = randn(r, in_features), randn(out_features, r)
    eps = smallest ** torch.rand(out_features, 1, generator=g, dtype=torch.float64)
    rest = randn(out_features, in_features)
    rest *= eps * (C @ A).norm(dim=1, keepdim=True) / rest.norm(dim=1, keepdim=True)
    W0, B = C @ A + rest, -C / s
    m = W0.norm(dim=1) * (1 + 0.1 * randn(out_features))
    x, G = randn(tokens, in_features), randn(tokens, out_features)
    # the magnitude is float32 in bf16/fp16 layers, as DoRALinear keeps it
    m_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(dtype), W0.to(dtype), A.to(dtype), B.to(dtype), m.to(m_dtype),
            G.to(dtype)), s


def values_and_gradients(f, x, W0, A, B, m, G):
    x, A, B, m = (t.detach().clone().requires_grad_() for t in (x, A, B, m))
    y = f(x, W0, A, B, m)
    return [y.detach(), *torch.autograd.grad(y, (x, A, B, m), G)]


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@given(seed=st.integers(0, 2**31), dtype=st.sampled_from(
    [torch.float64, torch.float32, torch.bfloat16, torch.float16]))
@pytest.mark.usefixtures("dora_path")
def test_under_cancellation_errors_stay_within_4x_of_the_textbook_formula(seed, dtype,
                                                                          detach_norm):
    """Rows of V' down to 1e-6·‖W0‖ (float32/64) or 1e-2·‖W0‖ (bf16/fp16). The yardstick is the
    textbook formula in the same dtype, or eps·κ (κ = the largest ‖w_j‖/‖v'_j‖), the size of its
    rounding error, when it happens to be luckier than that. ‖V'‖_c, y and every gradient stay
    within 4 times of it, and no row with ‖V'‖ > 0 gets norm 0."""
    smallest = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    (x, W0, A, B, m, G), s = cancelling_problem(seed, dtype, smallest)
    inputs64 = [t.double() for t in (x, W0, A, B, m, G)]
    V64 = inputs64[1] + s * inputs64[3] @ inputs64[2]
    norm64 = torch.linalg.vector_norm(V64, dim=1)
    floor = torch.finfo(dtype).eps * float((inputs64[1].norm(dim=1) / norm64).max())

    norm = adapted_row_norm(W0, A, B, s).double()
    textbook_norm = torch.linalg.vector_norm(W0 + s * B @ A, dim=1).double()
    assert (norm > 0).all()
    row_error = lambda n: ((n - norm64).abs() / norm64).max().item()  # noqa: E731
    assert row_error(norm) <= 4 * max(row_error(textbook_norm), floor)

    def textbook(x, W0, A, B, m):
        return textbook_dora(x, W0, A, B, m.to(W0.dtype), s, None, detach_norm)
    ours = values_and_gradients(lambda x, W0, A, B, m: dora_linear(
        x, W0, A, B, m, s, detach_norm=detach_norm), x, W0, A, B, m, G)
    theirs = values_and_gradients(textbook, x, W0, A, B, m, G)
    truth = values_and_gradients(textbook, *inputs64)
    for name, a, b, t in zip(["y", "x", "A", "B", "m"], ours, theirs, truth):
        error = rel_error(a.double().numpy(), t.numpy())
        assert error <= 4 * max(rel_error(b.double().numpy(), t.numpy()), floor), name


@pytest.mark.usefixtures("dora_path")
def test_exact_mode_gradient_for_rows_of_norm_1e_17_in_float32():
    """‖V'‖³ = 1e-51 is below float32's range; the exact gradient divides by ‖V'‖ one factor at
    a time and stays the exact one (not the detached one) and finite."""
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(4, 5, generator=g, dtype=torch.float64) * 1e-17
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    B = torch.zeros(4, 2, dtype=torch.float64)
    B[:, 0] = 1e-18
    m, x, G = torch.ones(4, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                              dtype=torch.float64), torch.randn(
        3, 4, generator=g, dtype=torch.float64)
    got = values_and_gradients(lambda x, W0, A, B, m: dora_linear(
        x, W0, A, B, m, 1.0, detach_norm=False), *(t.float() for t in (x, W0, A, B, m, G)))
    want = values_and_gradients(lambda x, W0, A, B, m: textbook_dora(
        x, W0, A, B, m, 1.0, None, False), x, W0, A, B, m, G)
    detached = values_and_gradients(lambda x, W0, A, B, m: textbook_dora(
        x, W0, A, B, m, 1.0, None, True), x, W0, A, B, m, G)
    assert rel_error(detached[3].numpy(), want[3].numpy()) > 0.1  # the norm's path matters
    for name, a, b in zip(["y", "x", "A", "B", "m"], got, want):
        assert torch.isfinite(a).all(), name
        assert rel_error(a.double().numpy(), b.numpy()) < 1e-5, name


# --- torch.func, double backward ----------------------------------------------------------------

TRAINABLE = ("lora_A", "lora_B", "magnitude")


def textbook_call(layer, params, x):
    """The layer's map written out for plain autograd (Eq. 5), from a dict of its parameters."""
    V = params["weight"] + layer.scaling * params["lora_B"] @ params["lora_A"]
    norm = torch.linalg.vector_norm(V, dim=1)
    norm = norm.detach() if layer.detach_norm else norm
    return nn.functional.linear(x, params["magnitude"][:, None] * V / norm[:, None],
                                params["bias"])


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.usefixtures("dora_path")
def test_torch_func_grad_jacrev_vmap_and_functional_call(detach_norm):
    layer = trained_layer(detach_norm=detach_norm)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    frozen = {k: v for k, v in params.items() if k not in TRAINABLE}
    train = {k: params[k] for k in TRAINABLE}
    x = torch.randn(4, 6, dtype=torch.float64)

    def ours(t, x):
        return functional_call(layer, {**frozen, **t}, (x,))

    def textbook(t, x):
        return textbook_call(layer, {**frozen, **t}, x)

    for transform in (lambda f: grad(lambda t: f(t, x).square().sum()),
                      lambda f: jacrev(lambda t: f(t, x))):
        got, want = transform(ours)(train), transform(textbook)(train)
        for name in TRAINABLE:
            assert rel_error(got[name].numpy(), want[name].numpy()) < 1e-12, name
    got, want = jacrev(layer)(x), jacrev(lambda x: textbook(train, x))(x)
    assert rel_error(got.detach().numpy(), want.numpy()) < 1e-12
    batch = torch.randn(3, 4, 6, dtype=torch.float64)
    for mode in (layer.train(), layer.eval()):
        with torch.no_grad():
            assert rel_error(vmap(mode)(batch).numpy(), textbook(train, batch).numpy()) < 1e-13


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.usefixtures("dora_path")
def test_double_backward_of_a_gradient_penalty(detach_norm):
    """create_graph=True: the gradient of ‖∂L/∂x‖² with respect to the adapter is plain
    autograd's on the textbook formula (so the Function's backward is differentiable too)."""
    layer = trained_layer(detach_norm=detach_norm)
    x = torch.randn(4, 6, dtype=torch.float64)

    def penalty_gradients(f, parameters):
        xr = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(f(xr).square().sum(), xr, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), parameters)

    params = {k: v.detach().clone().requires_grad_(k in TRAINABLE)
              for k, v in layer.named_parameters()}
    got = penalty_gradients(layer, [getattr(layer, k) for k in TRAINABLE])
    want = penalty_gradients(lambda x: textbook_call(layer, params, x),
                             [params[k] for k in TRAINABLE])
    for name, a, b in zip(TRAINABLE, got, want):
        assert rel_error(a.numpy(), b.numpy()) < 1e-12, name


# --- torch.compile, torch.export --------------------------------------------------------------

def compile_over_batch_sizes(backend):
    """fullgraph=True, dynamic=True: forward and backward at 8 batch sizes agree with eager;
    returns how many graphs dynamo compiled."""
    torch._dynamo.reset()
    layer = trained_layer(dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)
    compiles_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for tokens in (3, 5, 8, 13, 21, 34, 55, 89):
        x = torch.randn(tokens, 6)
        for module in (compiled, layer):
            layer.zero_grad()
            y = module(x)
            y.square().sum().backward()
            if module is compiled:
                y_compiled = y.detach()
                grads = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone(),
                         layer.magnitude.grad.clone()]
        assert rel_error(y_compiled.numpy(), y.detach().numpy()) < 1e-5
        for a, p in zip(grads, (layer.lora_A, layer.lora_B, layer.magnitude)):
            assert rel_error(a.numpy(), p.grad.numpy()) < 1e-5
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiles_before


def test_torch_compile_fullgraph_dynamic_aot_eager_compiles_at_most_twice():
    assert compile_over_batch_sizes("aot_eager") <= 2


@pytest.mark.slow
def test_torch_compile_fullgraph_dynamic_inductor_compiles_at_most_twice():
    assert compile_over_batch_sizes("inductor") <= 2


def test_torch_export_runs_under_grad_mode_and_differentiates():
    layer = trained_layer(dtype=torch.float32)
    x = torch.randn(4, 6)
    exported = torch.export.export(layer, (x,)).module()
    xr = x.clone().requires_grad_()
    y = exported(xr)
    y.square().sum().backward()
    xe = x.clone().requires_grad_()
    ye = layer(xe)
    ye.square().sum().backward()
    assert rel_error(y.detach().numpy(), ye.detach().numpy()) < 1e-6
    assert rel_error(xr.grad.numpy(), xe.grad.numpy()) < 1e-6


# --- the meta device ----------------------------------------------------------------------------

def test_meta_device_build_then_to_empty_then_reset_or_load():
    reference_layer = trained_layer(dtype=torch.float32)
    x = torch.randn(4, 6)
    moved = trained_layer(dtype=torch.float32).to("meta")
    assert moved.magnitude.is_meta and moved.magnitude.dtype == torch.float32
    with torch.device("meta"):
        layer = DoRALinear(6, 5, r=3, lora_alpha=6)
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    assert not any(p.is_meta for p in layer.parameters())
    assert layer.magnitude.dtype == torch.float32
    layer.reset_parameters()  # a working layer equal to its base at init
    base = nn.functional.linear(x, layer.weight, layer.bias)
    assert rel_error(layer(x).detach().numpy(), base.detach().numpy()) < 1e-6
    for assign in (False, True):
        with torch.device("meta"):
            layer = DoRALinear(6, 5, r=3, lora_alpha=6)
        if not assign:
            layer.to_empty(device="cpu")
        layer.load_state_dict(reference_layer.state_dict(), assign=assign)
        assert torch.equal(layer(x), reference_layer(x))
        assert layer.magnitude.requires_grad and not layer.weight.requires_grad


# --- FSDP2 --------------------------------------------------------------------------------------

def fsdp_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model = dm.inject_adapters(model, dm.LoraConfig(r=2, lora_alpha=4, use_dora=True))
    with torch.no_grad():
        for layer in model[::2]:
            layer.lora_B.normal_()
    return model


def fsdp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _fsdp_worker(rank, port, path, mixed_precision):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    model = fsdp_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for layer in model[::2]:  # one group per adapted layer, then the rest
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    x, y = fsdp_data()
    shard = slice(4 * rank, 4 * rank + 4)
    nn.functional.mse_loss(model(x[shard]).float(), y[shard]).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(grads, path)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown after the work is done


@pytest.mark.parametrize("mixed_precision", [
    False, pytest.param(True, marks=pytest.mark.slow)], ids=["float32", "bf16-compute"])
def test_fsdp2_gradients_equal_one_process_on_the_full_batch(tmp_path, mixed_precision):
    """Two gloo processes, half the batch each, float32 parameters. With param_dtype=bf16 the
    one-process reference computes with the parameters rounded to bf16, as FSDP2 does."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "grads.pt"
    mp.start_processes(_fsdp_worker, args=(port, str(path), mixed_precision), nprocs=2,
                       start_method="spawn")
    sharded = torch.load(path)
    model = fsdp_model()
    if mixed_precision:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16())
        model = model.bfloat16()  # DoRALinear keeps its magnitude float32 (rounded above)
    x, y = fsdp_data()
    nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sharded.keys() == single.keys() and len(single) == 6
    for name, grad_single in single.items():
        tolerance = 2e-2 if mixed_precision else 1e-6
        assert rel_error(sharded[name].float().numpy(), grad_single.float().numpy()) < tolerance


# --- what an adversarial review found ------------------------------------------------------------

def test_adapters_take_the_mode_of_the_module_they_replace(tmp_path):
    """A model loaded for inference (eval mode) stays in eval mode: no dropout at inference."""
    trained = dm.get_peft_model(nn.Sequential(nn.Linear(8, 8)), dm.LoraConfig(
        use_dora=True, lora_dropout=0.5))
    with torch.no_grad():
        trained[0].lora_B.normal_()
    dm.save_pretrained(trained, tmp_path)
    model = dm.from_pretrained(nn.Sequential(nn.Linear(8, 8)).eval(), tmp_path)
    x = torch.randn(4, 8)
    assert not model[0].training and torch.equal(model(x), model(x))


def test_a_linear_subclass_with_its_own_forward_is_not_replaced():
    class Half(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5
    model = nn.Sequential(Half(8, 8), nn.Linear(8, 8))
    dm.get_peft_model(model, dm.LoraConfig(use_dora=True))
    assert type(model[0]) is Half and isinstance(model[1], DoRALinear)
    with pytest.raises(ValueError, match="Half"):
        dm.get_peft_model(nn.Sequential(Half(8, 8)), dm.LoraConfig(target_modules=["0"]))


def test_scaling_lora_alpha_and_lora_dropout_stay_one_setting(tmp_path):
    base = nn.Sequential(nn.Linear(8, 8))
    model = dm.get_peft_model(nn.Sequential(nn.Linear(8, 8)), dm.LoraConfig(r=4, lora_alpha=8,
                                                                             use_dora=True))
    model[0].load_state_dict(base[0].state_dict(), strict=False)
    with torch.no_grad():
        model[0].lora_B.normal_()
    model[0].scaling = 5.0
    assert model[0].lora_alpha == 20.0
    model[0].lora_alpha = 12.0
    assert model[0].scaling == 3.0
    model[0].lora_dropout = 0.25
    assert isinstance(model[0].dropout, nn.Dropout) and model[0].dropout.p == 0.25
    with pytest.raises(ValueError, match="scaling"):
        model[0].scaling = -1.0
    model.eval()
    dm.save_pretrained(model, tmp_path)
    loaded = dm.from_pretrained(nn.Sequential(nn.Linear(8, 8)), tmp_path).eval()
    loaded[0].load_state_dict(model[0].state_dict(), strict=False)
    x = torch.randn(3, 8)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_unmerge_refuses_when_the_adapter_changed_since_merge():
    layer = trained_layer()
    W0 = layer.weight.detach().clone()
    layer.merge()
    layer.scaling = 1.0
    with pytest.raises(ValueError, match="changed since merge"):
        layer.unmerge()
    layer.scaling = 2.0  # as at merge()
    layer.unmerge()
    assert rel_error(layer.weight.detach().numpy(), W0.numpy()) < 1e-12


def test_autocast_leaves_a_float64_layer_in_float64_as_it_does_nn_linear():
    layer, x = trained_layer(), torch.randn(5, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == nn.Linear(6, 5, dtype=torch.float64)(x).dtype == torch.float64


def test_export_with_a_dynamic_token_dimension_and_compiled_autograd():
    torch.export.export(DoRALinear(32, 16, 4, 8), (torch.randn(10, 32),),
                        dynamic_shapes=({0: torch.export.Dim("tokens")},))
    torch.manual_seed(0)
    assert_compiled_autograd_agrees(DoRALinear(16, 12, 2, 4), torch.randn(8, 16))  # forms W'


def assert_compiled_autograd_agrees(layer, x):
    """Backward under compiled autograd gives the adapter the gradients of plain backward."""
    with torch.no_grad():
        layer.lora_B.normal_()
    loss = layer(x).square().sum()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    compiled = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    layer.zero_grad()
    layer(x).square().sum().backward()
    for a, p in zip(compiled, (layer.lora_A, layer.lora_B, layer.magnitude)):
        assert rel_error(a.numpy(), p.grad.numpy()) < 1e-5


@pytest.mark.usefixtures("dora_path")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_batched_gradients_of_autograd_grad(kind):
    if kind == "linear":
        layer, x = trained_layer(), torch.randn(7, 6, dtype=torch.float64)
    else:
        torch.manual_seed(0)
        layer = dm.DoRAConv1d.from_base(nn.Conv1d(3, 4, 3).double(), r=2, lora_alpha=4)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(2, 3, 9, dtype=torch.float64)
    y = layer(x)
    vectors = torch.randn(3, *y.shape, dtype=torch.float64)
    batched, = torch.autograd.grad(y, layer.lora_B, vectors, is_grads_batched=True,
                                   retain_graph=True)
    for v, got in zip(vectors, batched):
        want, = torch.autograd.grad(y, layer.lora_B, v, retain_graph=True)
        assert rel_error(got.numpy(), want.numpy()) < 1e-13


def test_saved_names_reload_where_one_is_the_end_of_another(tmp_path):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    adapted = dm.get_peft_model(model(), dm.LoraConfig(target_modules=["0"], use_dora=True))
    assert [n for n, _ in dm.adapter_layers(adapted)] == ["0", "1.0"]
    only_first = dm.get_peft_model(model(), dm.LoraConfig(target_modules="0", use_dora=True))
    assert [n for n, _ in dm.adapter_layers(only_first)] == ["0"]
    dm.save_pretrained(only_first, tmp_path)
    loaded = dm.from_pretrained(model(), tmp_path)
    assert [n for n, _ in dm.adapter_layers(loaded)] == ["0"]


def test_meta_model_loads_an_adapter_and_a_state_dict_without_extra_state(tmp_path):
    trained = dm.get_peft_model(nn.Sequential(nn.Linear(8, 8)), dm.LoraConfig(use_dora=True))
    dm.save_pretrained(trained, tmp_path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    dm.from_pretrained(model, tmp_path)  # shapes only: nothing to check on meta
    assert model[0].lora_A.is_meta
    state = {k: v for k, v in trained.state_dict().items() if not k.endswith("_extra_state")}
    fresh = dm.get_peft_model(nn.Sequential(nn.Linear(8, 8)), dm.LoraConfig(use_dora=True))
    fresh.load_state_dict(state)  # strict, yet no _extra_state: an unmerged layer
    assert not fresh[0].merged and torch.equal(fresh[0].lora_A, trained[0].lora_A)


def test_peft_quicktour_config_fields_are_accepted():
    config = dm.LoraConfig(task_type="CAUSAL_LM", inference_mode=False, r=8, lora_alpha=32,
                           lora_dropout=0.1, use_dora=True, fan_in_fan_out=False,
                           init_lora_weights=True)
    model = dm.get_peft_model(nn.Sequential(nn.Linear(4, 4)), config)
    assert dm.trainable_parameters(model).trainable == 8 * (4 + 4) + 4
    frozen = dm.get_peft_model(nn.Sequential(nn.Linear(4, 4)),
                               dm.LoraConfig(inference_mode=True))
    assert dm.trainable_parameters(frozen).trainable == 0
    with pytest.raises(ValueError, match="init_lora_weights"):
        dm.LoraConfig(init_lora_weights="gaussian")


def test_seq_cls_trains_the_head_as_peft_does_and_saves_it_with_the_adapter(tmp_path):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.score = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.score(self.body(x).tanh())
    model = dm.get_peft_model(Classifier(), dm.LoraConfig(target_modules=["body"],
                                                          task_type="SEQ_CLS"))
    assert model.score.weight.requires_grad and not model.body.weight.requires_grad
    dm.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [
        "score"]


def test_a_sparse_input_is_a_clear_error():
    with pytest.raises(TypeError, match="x: DoRALinear expected a dense"):
        trained_layer()(torch.randn(2, 6, dtype=torch.float64).to_sparse())


def test_each_call_takes_the_route_choose_route_names():
    """Plain eager float32/64 steps up to SMALL_STEP multiply-adds take merged_weight; larger
    ones blocked; dropout and bf16 steps blocked too; torch.func the core; eval merged_weight
    from as many tokens as inputs on, the core below that."""
    from dora_minimal import routes

    def route(layer, x, forced=None):
        with routes.force_route(forced):  # (None: the dora_path fixture may have forced one)
            return type(layer(x).grad_fn).__name__.removesuffix("Backward")
    layer = trained_layer(torch.float32)
    x = torch.randn(4, 6)
    assert route(layer, x) == "MergedWeight"
    assert route(layer, torch.randn(routes.SMALL_STEP // 30 + 1, 6)) == "Blocked"
    assert route(trained_layer(lora_dropout=0.5), x.double()) == "Blocked"
    assert route(trained_layer(torch.bfloat16), x.bfloat16()) == "Blocked"
    # W' (out·in) larger than x and y together: a big layer on few tokens keeps no (out, in)
    assert route(DoRALinear(256, 256, 4, 4), torch.randn(2, 256)) == "Blocked"
    with torch.no_grad(), routes.force_route(None):
        assert routes.choose_route(torch.randn(6, 6), None, layer.weight, False) == \
            "merged_weight"
        assert routes.choose_route(torch.randn(5, 6), None, layer.weight, False) == "core"
    assert route(layer, x, "core") == "DoRAFunction"
    with pytest.raises(ValueError, match="name: expected one of"):
        routes.force_route("fast").__enter__()
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    calls = []

    def loss(p):
        with routes.force_route("merged_weight"):  # (forced routes too: only in plain eager)
            calls.append(routes.choose_route(x, None, layer.weight, True))
        return functional_call(layer, p, (x,)).square().sum()
    ours = grad(loss)(params)  # the core under torch.func; the same numbers
    assert calls == ["core"]
    layer.zero_grad()
    layer(x).square().sum().backward()
    for name in ("lora_A", "lora_B", "magnitude"):
        assert rel_error(ours[name].numpy(), getattr(layer, name).grad.numpy()) < 1e-5


@pytest.mark.usefixtures("dora_path")
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_activation_checkpointing_and_saved_tensor_hooks_keep_the_gradients(detach_norm):
    """The routes' Functions save V', W', c and ‖V'‖_c from inside forward: checkpointing (both
    kinds) and save_on_cpu must still see, recompute or restore every one of them."""
    from torch.utils.checkpoint import checkpoint
    layer = trained_layer(detach_norm=detach_norm)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)

    def gradients(forward):
        for t in (x, *layer.parameters()):
            t.grad = None
        forward().square().sum().backward()
        return [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.magnitude)]

    def on_cpu():
        with torch.autograd.graph.save_on_cpu():
            return layer(x)
    plain = gradients(lambda: layer(x))
    for forward in (lambda: checkpoint(layer, x, use_reentrant=False),
                    lambda: checkpoint(layer, x, use_reentrant=True), on_cpu):
        for a, b in zip(gradients(forward), plain):
            assert torch.equal(a, b)
    textbook = gradients(lambda: textbook_dora(x, layer.weight, layer.lora_A, layer.lora_B,
                                               layer.magnitude, layer.scaling, layer.bias,
                                               detach_norm))
    for a, b in zip(plain, textbook):
        assert rel_error(a.numpy(), b.numpy()) < 1e-12


@pytest.mark.usefixtures("dora_path")
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-39), (torch.float64, 1e-309)])
def test_a_row_of_subnormal_norm_keeps_its_scale(dtype, tiny, detach_norm):
    """With one input feature ‖V'‖ can be subnormal (1/‖V'‖ overflows): c = m/‖V'‖ is still
    1 when m = ‖W0‖, on both routes, as in the textbook. There W' = m·sign(V'), so the exact
    gradient reaching V' (and A, B) is 0, and the detached one is c·∂L/∂W'."""
    weight = torch.full((1, 1), tiny, dtype=dtype)
    A, B = (torch.full((1, 1), tiny ** 0.5 / 4, dtype=dtype, requires_grad=True)
            for _ in range(2))  # s·B A = tiny / 16: V' stays subnormal
    m = weight.norm(dim=1).clone().requires_grad_()
    x = torch.ones(3, 1, dtype=dtype)
    y = dora_linear(x, weight, A, B, m, 1.0, detach_norm=detach_norm)
    grad_A, grad_B, grad_m = torch.autograd.grad(y.sum(), (A, B, m))
    V = tiny * 17 / 16
    assert torch.allclose(y, x * tiny, rtol=1e-6, atol=0) and grad_m.item() == 3.0
    detached = (tiny ** 0.5 / 4) * (tiny / V) * 3  # s·B^T c ∂L/∂W', c = m/V', ∂L/∂W' = Σx
    if detach_norm:
        assert rel_error(grad_A.numpy(), np.array([[detached]])) < 1e-6
    else:  # 0 up to the rounding of subnormal numbers
        assert abs(grad_A.item()) < 1e-6 * detached and abs(grad_B.item()) < 1e-6 * detached


@pytest.mark.usefixtures("dora_path")
@pytest.mark.parametrize("m0", [1.5, 0.0, float("nan"), float("inf")])
def test_a_zero_row_gives_its_bias_and_a_broken_magnitude_shows(m0):
    """The zero-row rule (c = m/‖V'‖_c is 0 where ‖V'‖_c = 0) on both routes, training and
    eval: the row gives its bias and its magnitude no gradient; a nan or inf magnitude there
    gives nan, as it does on any other row, instead of hiding behind the rule."""
    layer = trained_layer(torch.float32)
    with torch.no_grad():
        layer.weight[0] = 0
        layer.lora_B[0] = 0
        layer.magnitude[0] = m0
    x = torch.randn(4, 6, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    with torch.no_grad():
        y_eval = layer.eval()(x)
    for out in (y, y_eval):
        assert torch.isfinite(out[:, 1:]).all()
        if math.isfinite(m0):
            assert torch.equal(out[:, 0], layer.bias[0].expand(4))
        else:
            assert out[:, 0].isnan().all()
    if math.isfinite(m0):
        assert layer.magnitude.grad[0] == 0 and torch.isfinite(layer.lora_A.grad).all()


def test_a_parametrized_adapter_is_used_as_parametrized():
    """torch.nn.utils.parametrize turns lora_B into a computed attribute; the layer then reads
    it as such (as it reads a plain parameter otherwise)."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, B):
            return 2 * B
    layer = trained_layer()
    doubled = fresh_copy(layer)
    with torch.no_grad():
        doubled.lora_B.mul_(2)
    parametrize.register_parametrization(layer, "lora_B", Doubled())
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(layer(x), doubled(x), rtol=1e-12, atol=0)
    layer(x).sum().backward()
    doubled(x).sum().backward()
    original = layer.parametrizations.lora_B.original
    assert torch.allclose(original.grad, 2 * doubled.lora_B.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("size", [1e-25, 1e20])
def test_weight_rows_whose_norm_float32_cannot_compute_are_refused(size):
    """Entries of 1e-25 (squares underflow) or 1e20 (squares overflow): forward's float32 norm
    would be 0 or inf, and DoRA would silently give the row c = 0. Wrapping refuses, naming the
    row; the model stays as it was; in float64 the same weights work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[1] = size
    with pytest.raises(ValueError, match=r"rows \[1\].*float64"):
        dm.get_peft_model(model, dm.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                               use_dora=True))
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad
    layer = DoRALinear.from_linear(model[0].double(), 2, 4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = dm.reference.forward(x.numpy(), layer.weight.numpy(), layer.lora_A.detach().numpy(),
                                    layer.lora_B.detach().numpy(),
                                    layer.magnitude.detach().numpy(), layer.scaling,
                                    layer.bias.detach().numpy())
    assert rel_error(layer(x).detach().numpy(), expected) < 1e-12


def test_reset_magnitude_checks_every_layer_before_changing_any():
    model = dm.get_peft_model(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
                              dm.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"],
                                            use_dora=True))
    with torch.no_grad():
        model[0].weight.mul_(2)
        model[1].weight[0] = 1e-25
    before = [layer.magnitude.detach().clone() for layer in model]
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        dm.reset_magnitude(model)
    assert all(torch.equal(layer.magnitude, m) for layer, m in zip(model, before))


def test_merge_refuses_a_parametrized_weight():
    """merge() writes W' into the weight; a parametrized weight is computed, so the write would
    be lost while the layer called itself merged."""
    class Doubled(nn.Module):
        def forward(self, W):
            return 2 * W
    layer = trained_layer().eval()
    parametrize.register_parametrization(layer, "weight", Doubled())
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        with pytest.raises(ValueError, match="parametrized"):
            layer.merge()
        assert not layer.merged and torch.equal(layer(x), y)
        assert torch.allclose(layer.to_linear()(x), y, rtol=1e-12, atol=0)


@pytest.mark.parametrize("devices", [lambda: ["cuda"], None], ids=["no-cpu", "no-function"])
def test_the_toy_trains_with_the_default_adam_where_fused_is_missing(monkeypatch, devices):
    """torch checks a fused Adam's devices only at its first step: the toy asks first."""
    from torch.optim import optimizer
    from dora_minimal import toy
    if devices is None:
        monkeypatch.delattr(optimizer, "_get_fused_kernels_supported_devices")
    else:
        monkeypatch.setattr(optimizer, "_get_fused_kernels_supported_devices", devices)
    model = nn.Linear(4, 2)
    data = (torch.randn(16, 4), torch.randn(16, 2))
    losses = toy.train(model, data, 5, 1e-2, 4, torch.Generator().manual_seed(0))
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)


# --- found by an adversarial review of the core and its routes ---------------------------------

@pytest.mark.parametrize("route", ["core", "merged_weight", "blocked"])
@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_in_place_op_on_the_output_trains_on_every_route(route, shape, dtype):
    """nn.ReLU(inplace=True) after the layer: a Function's output that is a view of one of its
    own tensors cannot be changed in place, so no route returns one."""
    results = []
    for inplace in (True, False):
        layer = trained_layer(dtype)
        x = torch.randn(*shape, dtype=torch.float64).to(dtype)
        with dm.routes.force_route(route):
            y = nn.ReLU(inplace=inplace)(layer(x))
        y.float().square().sum().backward()
        results.append([y.detach(), layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("route", ["core", "merged_weight", "blocked"])
def test_the_magnitudes_gradient_is_summed_in_float32_in_fp16(route):
    """Σ G ⊙ y0 of ∂L/∂m: with G and y0 of 300 in fp16 each product overflows fp16 (65504); in
    float32 ∂L/∂m = 300·300/‖w‖ = 90000 fits (a GradScaler's scaled gradients look so)."""
    layer = DoRALinear(4, 2, r=1, lora_alpha=1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.bias.zero_()
    layer.reset_magnitude()
    layer = layer.half()
    x = torch.full((1, 4), 150.0, dtype=torch.float16)
    with dm.routes.force_route(route):
        y = layer(x)
    y.backward(torch.full_like(y, 300.0))
    assert torch.allclose(layer.magnitude.grad, torch.full((2,), 90000.0), rtol=1e-3)


def test_compiled_autograd_on_the_core_with_the_norm_detached():
    """A convolution (the core's route) in detach mode under compiled autograd: the Function
    takes A and B detached there, so it never returns None for an input needing a gradient."""
    torch.manual_seed(0)
    assert_compiled_autograd_agrees(dm.DoRAConv1d.from_base(nn.Conv1d(3, 4, 3), r=2,
                                                            lora_alpha=4), torch.randn(2, 3, 8))


def test_half_keeps_the_magnitude_and_its_gradient_in_float32_unrounded():
    layer = trained_layer(torch.float32)
    layer.magnitude.grad = torch.tensor([1e5, 1e-8, 1.0, 2.0, 3.0])
    values = layer.magnitude.detach().clone()
    layer.half()
    assert layer.magnitude.dtype == layer.magnitude.grad.dtype == torch.float32
    assert torch.equal(layer.magnitude.detach(), values)
    assert layer.magnitude.grad[0] == 1e5 and layer.magnitude.grad[1] == torch.tensor(1e-8)


def test_a_bf16_state_dict_loaded_with_assign_keeps_the_magnitude_float32():
    layer = trained_layer(torch.bfloat16)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["magnitude"] = state["magnitude"].bfloat16()
    layer.load_state_dict(state, assign=True)
    assert layer.magnitude.dtype == torch.float32 and layer.magnitude.requires_grad


def test_detach_norm_and_use_dora_are_checked_settings():
    layer = trained_layer()
    with pytest.raises(TypeError, match="detach_norm: expected True or False, got 'False'"):
        layer.detach_norm = "False"
    assert layer.detach_norm is True
    layer.detach_norm = False
    assert layer.detach_norm is False
    with pytest.raises(AttributeError, match="use_dora: is fixed when the layer is built"):
        layer.use_dora = False
    assert layer.use_dora and layer.magnitude is not None


def test_an_unfrozen_weight_is_refused_by_every_layer_kind_and_dora_scale():
    """With weight.requires_grad the exact mode's weight gradient would miss the norm's path:
    refused with a clear error, as dora_linear refuses it."""
    conv = dm.DoRAConv2d.from_base(nn.Conv2d(2, 3, 3), r=2, lora_alpha=4, detach_norm=False)
    conv.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="weight: expected a frozen weight"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="weight: expected a frozen weight"):
        dm.dora_scale(torch.ones(2, 3), torch.ones(3, 5, requires_grad=True), torch.ones(1, 5),
                      torch.ones(3, 1), torch.ones(3), 1.0)


@pytest.mark.parametrize("y0, message", [
    (torch.tensor([[3, -3, 7]]), "y0: expected a real floating dtype"),
    (torch.tensor([[True, False, True]]), "y0: expected a real floating dtype"),
    ([[1.0, 2.0, 3.0]], "y0: expected a Tensor"),
])
def test_dora_scale_refuses_a_y0_that_is_not_a_floating_tensor(y0, message):
    with pytest.raises(TypeError, match=message):
        dm.dora_scale(y0, torch.ones(3, 5), torch.ones(1, 5), torch.ones(3, 1), torch.ones(3), 1.0)


def test_lora_input_of_another_dtype_or_type_is_a_clear_error():
    args = (torch.ones(2, 5), torch.ones(3, 5), torch.ones(1, 5), torch.ones(3, 1), torch.ones(3),
            1.0)
    with pytest.raises(ValueError, match="lora_input: expected x's shape .* dtype torch.float32"):
        dm.dora_linear(*args, lora_input=torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="lora_input: expected a Tensor"):
        dm.dora_linear(*args, lora_input=[[1.0] * 5] * 2)
