"""Property tests of DoRA's four steps and their gradients, one equation of the paper per test.

They check `dora`, the module chosen by --impl: dora_minimal.reference by default, or your
solutions in tutorial/exercises/dora.py with `pytest tests/test_reference.py --impl=exercises`.
Every expected value is computed here independently, with plain NumPy, from the equations.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import gradient_error, problems, rel_error

DATA = Path(__file__).parent / "data"


def norms(W):
    """‖W‖_c computed independently of the module under test."""
    return np.linalg.norm(W, axis=1)


def adapted(p, A=None, B=None):
    """V' = W0 + s·B A (Eq. 5), computed independently of the module under test."""
    A = p.A if A is None else A
    B = p.B if B is None else B
    return p.W0 + p.scaling * B @ A


# --- Step 1: decompose (Eq. 2) ---------------------------------------------------------------

@given(problems())
def test_row_norm_is_the_l2_norm_of_each_output_row(dora, p):
    assert rel_error(dora.row_norm(p.W0), norms(p.W0)) < 1e-14


@given(problems())
def test_decompose_reconstructs_W_from_magnitude_and_unit_rows(dora, p):
    """Eq. 2: W0 = m · V/‖V‖_c with m = ‖W0‖_c; the direction has unit rows."""
    m, direction = dora.decompose(p.W0)
    assert m.shape == (p.W0.shape[0],) and direction.shape == p.W0.shape
    assert rel_error(m, norms(p.W0)) < 1e-14
    np.testing.assert_allclose(norms(direction), 1.0, rtol=1e-13)
    assert rel_error(m[:, None] * direction, p.W0) < 1e-14


# --- Step 2: adapt the direction (Eq. 5) ------------------------------------------------------

@given(problems())
def test_adapt_adds_the_scaled_low_rank_update(dora, p):
    """Eq. 5: V' = W0 + s·B A, here as a sum of r outer products."""
    update = sum(np.outer(p.B[:, k], p.A[k]) for k in range(p.A.shape[0]))
    assert rel_error(dora.adapt(p.W0, p.A, p.B, p.scaling), p.W0 + p.scaling * update) < 1e-14


# --- Step 3: recombine (Eq. 5) ----------------------------------------------------------------

@given(problems())
def test_recombined_rows_have_norm_abs_m(dora, p):
    """Eq. 5: W' = m · V'/‖V'‖_c, so ‖W'‖_c = |m| row by row."""
    W = dora.recombine(p.m, adapted(p))
    np.testing.assert_allclose(norms(W), np.abs(p.m), rtol=1e-13)


@given(problems(), st.data())
def test_rescaling_a_row_of_V_by_a_positive_factor_leaves_W_unchanged(dora, p, data):
    """Eq. 5: only the direction of each row of V' matters, not its length."""
    factors = np.array(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=len(p.m),
                                          max_size=len(p.m))))
    V = adapted(p)
    assert rel_error(dora.recombine(p.m, factors[:, None] * V), dora.recombine(p.m, V)) < 1e-13


# --- Step 4: merge and unmerge ----------------------------------------------------------------

@given(problems())
def test_at_init_merge_returns_W0_and_forward_is_the_plain_linear_map(dora, p):
    """B = 0 and m = ‖W0‖_c: the adapted layer is the pretrained layer."""
    B0, m0 = np.zeros_like(p.B), norms(p.W0)
    assert rel_error(dora.merge(p.W0, p.A, B0, m0, p.scaling), p.W0) < 1e-14
    expected = p.x @ p.W0.T + (0 if p.bias is None else p.bias)
    assert rel_error(dora.forward(p.x, p.W0, p.A, B0, m0, p.scaling, p.bias), expected) < 1e-13


@given(problems())
def test_merge_is_m_times_the_unit_rows_of_V(dora, p):
    V = adapted(p)
    expected = p.m[:, None] * V / norms(V)[:, None]
    assert rel_error(dora.merge(p.W0, p.A, p.B, p.m, p.scaling), expected) < 1e-13


@given(problems())
def test_unmerge_of_merge_returns_W0(dora, p):
    """W0 = W' ‖V'‖_c / m - s·B A, with the norm stored at merge time (float64: <= 1e-12)."""
    merged = dora.merge(p.W0, p.A, p.B, p.m, p.scaling)
    restored = dora.unmerge(merged, p.A, p.B, p.m, p.scaling, norms(adapted(p)))
    assert rel_error(restored, p.W0) <= 1e-12


@given(problems())
def test_forward_equals_the_linear_map_with_the_merged_weight(dora, p):
    """y = (m/‖V'‖_c) ⊙ (x W0^T + s (x A^T) B^T) + b equals x W'^T + b."""
    merged = dora.merge(p.W0, p.A, p.B, p.m, p.scaling)
    expected = p.x @ merged.T + (0 if p.bias is None else p.bias)
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    assert y.shape == p.x.shape[:-1] + (p.W0.shape[0],)
    assert rel_error(y, expected) < 1e-12


# --- Gradients (Section 4) --------------------------------------------------------------------

def loss_exact(p):
    """L = Σ grad_y ⊙ y, with y = x W'^T + b and the norm a function of A and B."""
    def loss():
        V = adapted(p)
        W = p.m[:, None] * V / norms(V)[:, None]
        return np.sum(p.grad_y * (p.x @ W.T))
    return loss


def loss_detached(p):
    """The same loss with ‖V'‖_c frozen at its current value: a constant, as Eq. 11 treats it."""
    frozen = norms(adapted(p))

    def loss():
        return np.sum(p.grad_y * (p.x @ adapted(p).T) * (p.m / frozen))
    return loss


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached-Eq11", "exact-Eq6"])
@given(p=problems(max_dim=4, max_rank=3, batch_dims=(1, 2), scales=(-1, 1)))
def test_backward_equals_centred_finite_differences(dora, p, detach_norm):
    loss = loss_detached(p) if detach_norm else loss_exact(p)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    assert set(grads) == {"x", "A", "B", "m"}
    terms = p.grad_y * (p.x @ adapted(p).T)
    for name, array in [("x", p.x), ("A", p.A), ("B", p.B), ("m", p.m)]:
        assert grads[name].shape == array.shape, name
        assert gradient_error(grads[name], loss, array, terms) < 1e-6, name


@given(problems(max_dim=4, max_rank=3, scales=(-1, 1)))
def test_exact_gradient_wrt_V_is_projected_orthogonal_to_V(dora, p):
    """Eq. 6: ∂L/∂V'_j = (m_j/‖V'_j‖)(I - V'_j V'_j^T/‖V'_j‖²) ∂L/∂W'_j is orthogonal to V'_j,
    and equals finite differences of L(V') = Σ ∂L/∂W' ⊙ W'(V')."""
    V = adapted(p)
    grad_W = np.random.default_rng(0).standard_normal(V.shape)
    grad_V = dora.adapted_weight_grad(V, p.m, grad_W, detach_norm=False)
    row_dots = np.sum(grad_V * V, axis=1)
    assert np.all(np.abs(row_dots) <= 1e-12 * norms(grad_V) * norms(V) + 1e-300)

    def loss():
        return np.sum(grad_W * (p.m[:, None] * V / norms(V)[:, None]))
    terms = grad_W * (p.m[:, None] * V / norms(V)[:, None])
    assert gradient_error(grad_V, loss, V, terms) < 1e-6


@given(problems())
def test_detached_gradient_wrt_V_is_the_scaled_gradient_wrt_W(dora, p):
    """Eq. 11: with ‖V'‖_c treated as a constant, ∂L/∂V' = (m/‖V'‖_c) ∂L/∂W'."""
    V = adapted(p)
    grad_W = np.random.default_rng(1).standard_normal(V.shape)
    expected = (p.m / norms(V))[:, None] * grad_W
    assert rel_error(dora.adapted_weight_grad(V, p.m, grad_W, detach_norm=True), expected) < 1e-14


@pytest.mark.parametrize("detach_norm", [True, False])
@given(p=problems())
def test_magnitude_gradient_is_eq7_in_both_modes(dora, p, detach_norm):
    """Eq. 7: ∂L/∂m_j = (∂L/∂W'_j · V'_j)/‖V'_j‖ = Σ_t G_tj (x V'^T)_tj / ‖V'_j‖."""
    V = adapted(p)
    x2, G = p.x.reshape(-1, p.x.shape[-1]), p.grad_y.reshape(-1, p.grad_y.shape[-1])
    expected = np.sum(G * (x2 @ V.T), axis=0) / norms(V)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    assert rel_error(grads["m"], expected) < 1e-12
    assert rel_error(dora.magnitude_grad(V, G.T @ x2), expected) < 1e-12


# --- Dead units and extreme scales ------------------------------------------------------------

@pytest.mark.parametrize("detach_norm", [True, False])
@given(p=problems(batch_dims=(1, 2)), row=st.integers(0, 5))
def test_a_zero_row_gives_no_nan_and_a_dead_unit(dora, p, detach_norm, row):
    """Zero-row rule: a row of V' that is exactly 0 has scale 0; the unit outputs its bias."""
    row = row % p.W0.shape[0]
    p.W0[row] = 0.0
    p.B[row] = 0.0
    m, direction = dora.decompose(p.W0)
    assert m[row] == 0 and np.all(direction[row] == 0) and np.all(np.isfinite(direction))
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    assert np.all(np.isfinite(y))
    assert np.all(y[..., row] == (0.0 if p.bias is None else p.bias[row]))
    merged = dora.merge(p.W0, p.A, p.B, p.m, p.scaling)
    assert np.all(np.isfinite(merged)) and np.all(merged[row] == 0)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert grads["m"][row] == 0


@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
def test_extreme_weight_scales_merge_without_overflow(dora, scale):
    rng = np.random.default_rng(7)
    W0, A = rng.standard_normal((5, 4)) * scale, rng.standard_normal((2, 4))
    B = rng.standard_normal((5, 2)) * scale
    m = norms(W0 / scale) * scale * 1.5
    merged = dora.merge(W0, A, B, m, 2.0)
    assert np.all(np.isfinite(merged))
    np.testing.assert_allclose(norms(merged / scale) * scale, m, rtol=1e-13)
    np.testing.assert_allclose(dora.row_norm(W0), norms(W0 / scale) * scale, rtol=1e-14)


def test_row_norm_of_tiny_float32_weights_does_not_underflow(dora):
    """1e-30² underflows float32: squaring first would give a norm of 0."""
    W = np.full((2, 3), 1e-30, dtype=np.float32)
    np.testing.assert_allclose(dora.row_norm(W), np.sqrt(3) * 1e-30, rtol=1e-6)


# --- Agreement with Hugging Face PEFT (golden vectors, float64) -------------------------------

CASES = json.loads((DATA / "peft_lora_dora_float64.json").read_text())["cases"]


@pytest.mark.parametrize("case", [c for c in CASES if c["use_dora"]], ids=lambda c: c["name"])
def test_agrees_with_peft_golden_vectors(dora, case):
    data = np.load(DATA / "peft_lora_dora_float64.npz")

    def get(key):
        return data.get(f"{case['name']}_{key}")
    args = (get("x"), get("weight"), get("lora_A"), get("lora_B"), get("magnitude"),
            case["scaling"])
    assert rel_error(dora.forward(*args, bias=get("bias")), get("y")) < 1e-13
    assert rel_error(dora.merge(*args[1:]), get("merged_weight")) < 1e-13
    grads = dora.backward(*args, get("grad_y"), detach_norm=True)
    for name, key in [("x", "grad_x"), ("A", "grad_lora_A"), ("B", "grad_lora_B"),
                      ("m", "grad_magnitude")]:
        assert rel_error(grads[name], get(key)) < 1e-13, name
