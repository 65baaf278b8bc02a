"""dora_linear (the autograd.Function with a hand-written backward) against the NumPy reference,
against plain autograd on the textbook formula, against finite differences and against PEFT.

CUDA variants run when a GPU is present and skip otherwise.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given

from dora_minimal import core, dora_linear, lora_linear, reference
from dora_minimal.routes import force_route
from dora_minimal.bench import PeakMemory
from helpers import problems, rel_error

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.usefixtures("dora_path")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


@pytest.fixture
def blocked_route():
    """The route of large linear steps, which these tests hold to its memory bounds."""
    with force_route("blocked"):
        yield


def tensors(p, device="cpu", dtype=torch.float64, requires_grad=True):
    """The problem's trainable inputs (x, A, B, m) and frozen ones (W0, bias) as torch tensors."""
    def t(a, grad):
        return None if a is None else torch.tensor(a, device=device, dtype=dtype,
                                                   requires_grad=grad and requires_grad)
    return (t(p.x, True), t(p.W0, False), t(p.A, True), t(p.B, True), t(p.m, True),
            t(p.bias, False))


def textbook_dora(x, W0, A, B, m, scaling, bias, detach_norm):
    """DoRA as the paper writes it, for plain autograd: materialize V' and W' (Eq. 5)."""
    V = W0 + scaling * B @ A  # (out, in)
    norm = torch.linalg.vector_norm(V, dim=1)
    if detach_norm:
        norm = norm.detach()  # Eq. 11
    W = m[:, None] * V / norm[:, None]
    return torch.nn.functional.linear(x, W, bias)


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@given(p=problems())
def test_agrees_with_the_numpy_reference_in_float64(p, detach_norm):
    x, W0, A, B, m, bias = tensors(p)
    y = dora_linear(x, W0, A, B, m, p.scaling, bias, detach_norm=detach_norm)
    y.backward(torch.tensor(p.grad_y))
    expected = reference.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm)
    assert rel_error(y.detach().numpy(), reference.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling,
                                                           p.bias)) < 1e-12
    # the exact gradient is a difference of two terms; the detached one is the first of them
    terms = reference.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=True)
    for name, tensor in [("x", x), ("A", A), ("B", B), ("m", m)]:
        assert tensor.grad.shape == tensor.shape
        scale = np.max(np.abs(terms[name]), initial=0.0)
        assert rel_error(tensor.grad.numpy(), expected[name], scale) < 1e-10, name


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@given(p=problems(min_tokens=1))
def test_agrees_with_plain_autograd_on_the_textbook_formula(p, detach_norm):
    x, W0, A, B, m, bias = tensors(p)
    G = torch.tensor(p.grad_y)
    ours = torch.autograd.grad((dora_linear(x, W0, A, B, m, p.scaling, bias, detach_norm) * G)
                               .sum(), (x, A, B, m))
    textbook = torch.autograd.grad((textbook_dora(x, W0, A, B, m, p.scaling, bias, detach_norm)
                                    * G).sum(), (x, A, B, m))
    terms = reference.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=True)
    for name, a, b in zip("xABm", ours, textbook):
        scale = np.max(np.abs(terms[name]), initial=0.0)
        assert rel_error(a.numpy(), b.numpy(), scale) < 1e-10, name


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_exact_mode_and_the_exact_parts_of_detached_mode(device):
    torch.manual_seed(0)
    kw = dict(device=device, dtype=torch.float64)
    W0 = torch.randn(5, 4, **kw)
    x = torch.randn(2, 3, 4, **kw, requires_grad=True)
    A = torch.randn(3, 4, **kw, requires_grad=True)
    B = torch.randn(5, 3, **kw, requires_grad=True)
    m = (torch.linalg.vector_norm(W0, dim=1) * 1.2).requires_grad_()
    bias = torch.randn(5, **kw, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, A, B, m, b: dora_linear(x, W0, A, B, m, 1.5, b, detach_norm=False),
        (x, A, B, m, bias))
    # with the norm detached, the gradients for x, m and the bias are still exact
    assert torch.autograd.gradcheck(
        lambda x, m, b: dora_linear(x, W0, A.detach(), B.detach(), m, 1.5, b), (x, m, bias))


def test_detached_mode_is_not_the_exact_gradient():
    """Eq. 11 drops a term: with B != 0 the two modes must differ for A and B."""
    torch.manual_seed(1)
    W0, x = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    A = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    m = torch.linalg.vector_norm(W0, dim=1)
    grads = [torch.autograd.grad(dora_linear(x, W0, A, B, m, 2.0, detach_norm=d).square().sum(),
                                 (A, B)) for d in (True, False)]
    assert rel_error(grads[0][0].numpy(), grads[1][0].numpy()) > 1e-3


@given(problems())
def test_lora_linear_is_the_plain_low_rank_update(p):
    x, W0, A, B, _, bias = tensors(p)
    expected = x @ W0.T + p.scaling * x @ A.T @ B.T + (0 if bias is None else bias)
    y = lora_linear(x, W0, A, B, p.scaling, bias)
    assert rel_error(y.detach().numpy(), expected.detach().numpy()) < 1e-13


def test_adapter_input_gets_its_own_gradient():
    """With lora_input (dropout(x) in training) x only sees W0, lora_input only sees s·B A."""
    torch.manual_seed(2)
    kw = dict(dtype=torch.float64)
    x, xa = torch.randn(5, 4, **kw, requires_grad=True), torch.randn(5, 4, **kw, requires_grad=True)
    W0, A, B = torch.randn(3, 4, **kw), torch.randn(2, 4, **kw), torch.randn(3, 2, **kw)
    m = torch.rand(3, **kw) + 0.5
    y = dora_linear(x, W0, A, B, m, 2.0, lora_input=xa)
    norm = torch.linalg.vector_norm(W0 + 2.0 * B @ A, dim=1)
    expected = (m / norm) * (x @ W0.T + 2.0 * xa @ A.T @ B.T)
    assert rel_error(y.detach().numpy(), expected.detach().numpy()) < 1e-13
    G = torch.randn(5, 3, **kw)
    gx, gxa = torch.autograd.grad((y * G).sum(), (x, xa))
    ex, exa = torch.autograd.grad((expected * G).sum(), (x, xa))
    assert rel_error(gx.numpy(), ex.numpy()) < 1e-13 and rel_error(gxa.numpy(), exa.numpy()) < 1e-13


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("separate_adapter_input", [False, True])
def test_backward_over_several_token_blocks_agrees_with_the_reference(detach_norm,
                                                                      separate_adapter_input,
                                                                      blocked_route):
    """Backward forms its (tokens, out) temporaries in blocks of >= 512 tokens: 1500 make three."""
    rng = np.random.default_rng(4)
    x, xa, G = (rng.standard_normal((3, 500, 6)), rng.standard_normal((3, 500, 6)),
                rng.standard_normal((3, 500, 5)))
    W0, A, B = rng.standard_normal((5, 6)), rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    m = np.linalg.norm(W0, axis=1) * 1.1
    t = [torch.tensor(v, requires_grad=True) for v in (x, xa, A, B, m)]
    y = dora_linear(t[0], torch.tensor(W0), t[2], t[3], t[4], 1.5, detach_norm=detach_norm,
                    lora_input=t[1] if separate_adapter_input else None)
    y.backward(torch.tensor(G))
    if separate_adapter_input:  # the reference's x is the one input; split its gradient by hand
        c = m / np.linalg.norm(W0 + 1.5 * B @ A, axis=1)
        expected_x = (G * c) @ W0
        expected_xa = 1.5 * ((G * c) @ B) @ A
        assert rel_error(t[0].grad.numpy(), expected_x) < 1e-12
        assert rel_error(t[1].grad.numpy(), expected_xa) < 1e-12
        return
    expected = reference.backward(x, W0, A, B, m, 1.5, G, detach_norm)
    for tensor, name in [(t[0], "x"), (t[2], "A"), (t[3], "B"), (t[4], "m")]:
        assert rel_error(tensor.grad.numpy(), expected[name]) < 1e-12, name


def training_inputs(tokens, in_features, out_features, r):
    """Random float64 inputs of one training step: x, W0, A, B, m (trainable but W0), and G."""
    generator = torch.Generator().manual_seed(0)
    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)
    return (randn(tokens, in_features), randn(out_features, in_features, grad=False),
            randn(r, in_features), randn(out_features, r), randn(out_features),
            randn(tokens, out_features, grad=False))


@pytest.mark.parametrize("detach_norm", [True, False])
def test_forward_forms_v_prime_one_bounded_block_of_rows_at_a_time(monkeypatch, detach_norm,
                                                                   blocked_route):
    """Forward's new tensors are y0 and y (T, out), pieces r wide or (out,) long, and one block of
    V' rows (16 rows here, where V' has 256): never V' (out, in) whole, 16 times y's size."""
    T, n_in, n_out, r = 16, 256, 256, 2
    monkeypatch.setattr(core, "NORM_BLOCK_ELEMENTS", 16 * n_in)
    x, W0, A, B, m, _ = training_inputs(T, n_in, n_out, r)
    with PeakMemory() as memory:
        y = dora_linear(x, W0, A, B, m, 2.0, detach_norm=detach_norm)
    assert memory.peak <= 8 * (2 * T * n_out + 16 * n_in + (T + 4 * n_out) * r + 16 * n_out)
    expected = textbook_dora(x, W0, A, B, m, 2.0, None, detach_norm)
    assert rel_error(y.detach().numpy(), expected.detach().numpy()) < 1e-13


@pytest.mark.parametrize("detach_norm", [True, False])
def test_backward_holds_one_block_of_tokens_at_a_time(detach_norm, blocked_route):
    """Backward's (T, out) temporaries are formed a block of tokens at a time, in one buffer: at
    its peak it holds ∂L/∂x, one block (512 tokens here, where out = 8·in) and pieces r wide or
    (out,) long, nothing of size (T, out). Two blocks alive at once would not fit. The eight
    blocks (the last one short) give the gradients of plain autograd on the textbook formula."""
    T, n_in, n_out, r = 4000, 8, 64, 2
    x, W0, A, B, m, G = training_inputs(T, n_in, n_out, r)
    y = dora_linear(x, W0, A, B, m, 2.0, detach_norm=detach_norm)
    with PeakMemory() as memory:
        grads = torch.autograd.grad(y, (x, A, B, m), G)
    # ... and, in exact mode, one block of V' rows (all 64 of them at this size)
    assert memory.peak <= 8 * (T * n_in + 512 * n_out + T * r + 4 * (n_in + n_out) * r
                               + 16 * n_out + (0 if detach_norm else n_out * n_in))
    expected = torch.autograd.grad(textbook_dora(x, W0, A, B, m, 2.0, None, detach_norm),
                                   (x, A, B, m), G)
    for name, got, want in zip("xABm", grads, expected):
        assert rel_error(got.numpy(), want.numpy()) < 1e-12, name


# --- PEFT golden vectors ----------------------------------------------------------------------

CASES = json.loads((DATA / "peft_lora_dora_float64.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{c['name']}-{'dora' if c['use_dora'] else 'lora'}")
def test_agrees_with_peft_golden_vectors(case):
    data = np.load(DATA / "peft_lora_dora_float64.npz")

    def get(key, grad=False):
        value = data.get(f"{case['name']}_{key}")
        return None if value is None else torch.tensor(value, requires_grad=grad)
    x, A, B = get("x", True), get("lora_A", True), get("lora_B", True)
    W0, bias, s = get("weight"), get("bias"), case["scaling"]
    trained = [x, A, B]
    if case["use_dora"]:
        m = get("magnitude", True)
        trained.append(m)
        y = dora_linear(x, W0, A, B, m, s, bias)
    else:
        y = lora_linear(x, W0, A, B, s, bias)
    assert rel_error(y.detach().numpy(), get("y").numpy()) < 1e-13
    y.backward(get("grad_y"))
    for tensor, key in zip(trained, ["grad_x", "grad_lora_A", "grad_lora_B", "grad_magnitude"]):
        assert rel_error(tensor.grad.numpy(), get(key).numpy()) < 1e-13, key


# --- Half precision ---------------------------------------------------------------------------

def half_problem(device, dtype, seed=0, tokens=64, inp=48, out=40, r=8):
    """A layer-sized problem in `dtype`, and the same numbers in float64."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, inp, generator=g) / inp**0.5
    A = torch.randn(r, inp, generator=g) / inp**0.5
    B = torch.randn(out, r, generator=g) * 0.1
    m = torch.linalg.vector_norm(W0, dim=1) * (1 + 0.1 * torch.rand(out, generator=g))
    x, G = torch.randn(tokens, inp, generator=g), torch.randn(tokens, out, generator=g)
    low = [t.to(device, dtype) for t in (x, W0, A, B)] + [m.to(device)]
    exact = [t.to(device, dtype).double() for t in (x, W0, A, B)] + [m.to(device).double()]
    return low, exact, G.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_half_precision_forward_and_backward_within_1e_2_of_float64(device, dtype, detach_norm):
    low, exact, G = half_problem(device, dtype)
    results = []
    for x, W0, A, B, m in (low, exact):
        x, A, B, m = (t.clone().requires_grad_() for t in (x, A, B, m))
        y = dora_linear(x, W0, A, B, m, 2.0, detach_norm=detach_norm)
        y.backward(G.to(y.dtype))
        results.append([y, x.grad, A.grad, B.grad, m.grad])
    assert results[0][0].dtype == dtype and results[0][4].dtype == torch.float32
    for name, a, b in zip(["y", "x", "A", "B", "m"], *results):
        assert rel_error(a.detach().double().cpu().numpy(), b.detach().cpu().numpy()) <= 1e-2, name


@pytest.mark.parametrize("device", DEVICES)
def test_a_1e_3_change_of_magnitude_moves_bf16_outputs_by_about_1e_3(device):
    """c = m/‖V'‖_c is applied in float32: rounded to bf16 (step 2^-7 near 1) a 1e-3 change
    would vanish."""
    (x, W0, A, B, m), _, _ = half_problem(device, torch.bfloat16, tokens=256)
    y1 = dora_linear(x, W0, A, B, m, 2.0).double()
    y2 = dora_linear(x, W0, A, B, m * (1 + 1e-3), 2.0).double()
    relative_change = float(((y2 - y1) * y1).sum() / (y1 * y1).sum())  # least-squares slope
    assert relative_change == pytest.approx(1e-3, rel=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_non_contiguous_input(device):
    kw = dict(device=device, dtype=torch.float64)
    W0, A, B = torch.randn(3, 4, **kw), torch.randn(2, 4, **kw), torch.randn(3, 2, **kw)
    m = torch.ones(3, **kw, requires_grad=True)
    empty = torch.zeros(0, 5, 4, **kw, requires_grad=True)
    y = dora_linear(empty, W0, A, B, m, 1.0)
    assert y.shape == (0, 5, 3)
    y.sum().backward()
    assert torch.all(m.grad == 0) and empty.grad.shape == empty.shape
    x = torch.randn(4, 6, **kw)[:, ::2].T  # (3, 4), not contiguous
    assert not x.is_contiguous()
    assert torch.allclose(dora_linear(x, W0, A, B, m, 1.0), dora_linear(x.contiguous(), W0, A, B,
                                                                         m, 1.0))
