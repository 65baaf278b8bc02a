"""Property tests of DoRA's four steps and their gradients, one equation of the paper per test.

They check `dora`, the module chosen by --impl: dora_minimal.reference by default, your solutions
in tutorial/exercises/dora.py with `--impl=exercises`, or a file of yours with `--impl=PATH.py`.
Every test is marked with the exercise that makes it runnable (it calls exercises up to that one)
and the equation it checks; `--exercise N` runs the tests of exercises 1..N (see conftest.py).
Every expected value is computed here independently, with plain NumPy, from the equations.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import gradient_error, problems, rel_error

DATA = Path(__file__).parent / "data"


def exercise(n, eq=None):
    """Marks a test that exercises 1..n make runnable and that checks the paper's Eq. `eq`."""
    return pytest.mark.exercise(n, eq)


def norms(W):
    """‖W‖_c computed independently of the module under test."""
    return np.linalg.norm(W, axis=1)


def adapted(p, A=None, B=None):
    """V' = W0 + s·B A (Eq. 5), computed independently of the module under test."""
    A = p.A if A is None else A
    B = p.B if B is None else B
    return p.W0 + p.scaling * B @ A


def merged(p, m=None, B=None):
    """W' = m · V'/‖V'‖_c (Eq. 5), computed independently of the module under test."""
    m = p.m if m is None else m
    V = adapted(p, B=B)
    return m[:, None] * V / norms(V)[:, None]


def with_zero_row(p, row):
    """p with row `row` (modulo out) of W0 and of B set to 0, so that row of V' is 0."""
    row = row % p.W0.shape[0]
    p.W0[row] = 0.0
    p.B[row] = 0.0
    return row


CASES = [case for case in json.loads((DATA / "peft_lora_dora_float64.json").read_text())["cases"]
         if case["use_dora"]]


def golden(case):
    """One case of Hugging Face PEFT's golden vectors (float64): {key: array}."""
    data = np.load(DATA / "peft_lora_dora_float64.npz")
    prefix = case["name"] + "_"
    return {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}


def golden_args(case):
    """(x, W0, A, B, m, scaling) of a golden case, in the order the functions take them."""
    g = golden(case)
    return (g["x"], g["weight"], g["lora_A"], g["lora_B"], g["magnitude"], case["scaling"]), g


# --- Exercise 1: row_norm, the paper's ‖·‖_c (Eq. 2) ------------------------------------------

@exercise(1, eq=2)
@given(problems())
def test_row_norm_is_the_l2_norm_of_each_output_row(dora, p):
    assert rel_error(dora.row_norm(p.W0), norms(p.W0)) < 1e-14


@exercise(1, eq=2)
@pytest.mark.parametrize("scale", [1e-200, 1e-20, 1.0, 1e20, 1e200])
def test_row_norm_of_huge_and_tiny_float64_rows_neither_overflows_nor_underflows(dora, scale):
    """Squares of 1e200 overflow float64 and squares of 1e-200 underflow it."""
    W = np.random.default_rng(7).standard_normal((5, 4))
    np.testing.assert_allclose(dora.row_norm(W * scale), norms(W) * scale, rtol=1e-14)


@exercise(1, eq=2)
def test_row_norm_of_tiny_float32_weights_does_not_underflow(dora):
    """1e-30² underflows float32: squaring first would give a norm of 0."""
    W = np.full((2, 3), 1e-30, dtype=np.float32)
    np.testing.assert_allclose(dora.row_norm(W), np.sqrt(3) * 1e-30, rtol=1e-6)


# --- Exercise 2: decompose (Eq. 2) ------------------------------------------------------------

@exercise(2, eq=2)
@given(problems())
def test_decompose_reconstructs_W_from_magnitude_and_unit_rows(dora, p):
    """Eq. 2: W0 = m · V/‖V‖_c with m = ‖W0‖_c; the direction has unit rows."""
    m, direction = dora.decompose(p.W0)
    assert m.shape == (p.W0.shape[0],) and direction.shape == p.W0.shape
    assert rel_error(m, norms(p.W0)) < 1e-14
    np.testing.assert_allclose(norms(direction), 1.0, rtol=1e-13)
    assert rel_error(m[:, None] * direction, p.W0) < 1e-14


@exercise(2, eq=2)
@given(p=problems(), row=st.integers(0, 5))
def test_decompose_gives_a_zero_row_a_zero_direction(dora, p, row):
    """Zero-row rule: a row of zeros has magnitude 0 and direction 0, not 0/0 = NaN."""
    row = with_zero_row(p, row)
    m, direction = dora.decompose(p.W0)
    assert m[row] == 0 and np.all(direction[row] == 0) and np.all(np.isfinite(direction))


# --- Exercise 3: adapt (Eq. 5) ----------------------------------------------------------------

@exercise(3, eq=5)
@given(problems())
def test_adapt_adds_the_scaled_low_rank_update(dora, p):
    """Eq. 5: V' = W0 + s·B A, here as a sum of r outer products."""
    update = sum(np.outer(p.B[:, k], p.A[k]) for k in range(p.A.shape[0]))
    assert rel_error(dora.adapt(p.W0, p.A, p.B, p.scaling), p.W0 + p.scaling * update) < 1e-14


# --- Exercise 4: recombine (Eq. 5) ------------------------------------------------------------

@exercise(4, eq=5)
@given(problems())
def test_recombine_gives_rows_of_norm_abs_m(dora, p):
    """Eq. 5: W' = m · V'/‖V'‖_c, so ‖W'‖_c = |m| row by row."""
    W = dora.recombine(p.m, adapted(p))
    np.testing.assert_allclose(norms(W), np.abs(p.m), rtol=1e-13)


@exercise(4, eq=5)
@given(problems(), st.data())
def test_recombine_ignores_the_length_of_each_row_of_V(dora, p, data):
    """Eq. 5: only the direction of each row of V' matters: rescaling a row by a positive factor
    leaves W' unchanged."""
    factors = np.array(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=len(p.m),
                                          max_size=len(p.m))))
    V = adapted(p)
    assert rel_error(dora.recombine(p.m, factors[:, None] * V), dora.recombine(p.m, V)) < 1e-13


# --- Exercise 5: forward (Eq. 5) --------------------------------------------------------------

@exercise(5, eq=5)
@given(problems())
def test_forward_equals_the_linear_map_with_the_merged_weight(dora, p):
    """y = (m/‖V'‖_c) ⊙ (x W0^T + s (x A^T) B^T) + b equals x W'^T + b."""
    expected = p.x @ merged(p).T + (0 if p.bias is None else p.bias)
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    assert y.shape == p.x.shape[:-1] + (p.W0.shape[0],)
    assert rel_error(y, expected) < 1e-12


@exercise(5, eq=5)
@given(problems())
def test_forward_at_init_is_the_plain_linear_map(dora, p):
    """B = 0 and m = ‖W0‖_c: the adapted layer is the pretrained layer."""
    B0, m0 = np.zeros_like(p.B), norms(p.W0)
    expected = p.x @ p.W0.T + (0 if p.bias is None else p.bias)
    assert rel_error(dora.forward(p.x, p.W0, p.A, B0, m0, p.scaling, p.bias), expected) < 1e-13


@exercise(5, eq=5)
@given(p=problems(batch_dims=(1, 2)), row=st.integers(0, 5))
def test_forward_of_a_zero_row_outputs_the_bias(dora, p, row):
    """Zero-row rule: a row of V' that is exactly 0 has scale 0; the unit outputs its bias."""
    row = with_zero_row(p, row)
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    assert np.all(np.isfinite(y))
    assert np.all(y[..., row] == (0.0 if p.bias is None else p.bias[row]))


@exercise(5, eq=5)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_forward_agrees_with_peft_golden_vectors(dora, case):
    args, g = golden_args(case)
    assert rel_error(dora.forward(*args, bias=g.get("bias")), g["y"]) < 1e-13


# --- Exercise 6: merge (Eq. 5) ----------------------------------------------------------------

@exercise(6, eq=5)
@given(problems())
def test_merge_is_m_times_the_unit_rows_of_V(dora, p):
    assert rel_error(dora.merge(p.W0, p.A, p.B, p.m, p.scaling), merged(p)) < 1e-13


@exercise(6, eq=5)
@given(problems())
def test_merge_at_init_returns_W0(dora, p):
    """B = 0 and m = ‖W0‖_c: the merged weight is the pretrained weight."""
    B0, m0 = np.zeros_like(p.B), norms(p.W0)
    assert rel_error(dora.merge(p.W0, p.A, B0, m0, p.scaling), p.W0) < 1e-14


@exercise(6, eq=5)
@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
def test_merge_of_extreme_weight_scales_does_not_overflow(dora, scale):
    rng = np.random.default_rng(7)
    W0, A = rng.standard_normal((5, 4)) * scale, rng.standard_normal((2, 4))
    B = rng.standard_normal((5, 2)) * scale
    m = norms(W0 / scale) * scale * 1.5
    W = dora.merge(W0, A, B, m, 2.0)
    assert np.all(np.isfinite(W))
    np.testing.assert_allclose(norms(W / scale) * scale, m, rtol=1e-13)


@exercise(6, eq=5)
@given(p=problems(), row=st.integers(0, 5))
def test_merge_of_a_zero_row_is_a_zero_row(dora, p, row):
    """Zero-row rule: a row of V' that is exactly 0 gives a row of W' that is 0, not NaN."""
    row = with_zero_row(p, row)
    W = dora.merge(p.W0, p.A, p.B, p.m, p.scaling)
    assert np.all(np.isfinite(W)) and np.all(W[row] == 0)


@exercise(6, eq=5)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_merge_agrees_with_peft_golden_vectors(dora, case):
    args, g = golden_args(case)
    assert rel_error(dora.merge(*args[1:]), g["merged_weight"]) < 1e-13


# --- Exercise 7: unmerge (Eq. 5 solved for W0) ------------------------------------------------

@exercise(7, eq=5)
@given(problems())
def test_unmerge_of_merge_returns_W0(dora, p):
    """W0 = W' ‖V'‖_c / m - s·B A, with the norm stored at merge time (float64: <= 1e-12)."""
    restored = dora.unmerge(merged(p), p.A, p.B, p.m, p.scaling, norms(adapted(p)))
    assert rel_error(restored, p.W0) <= 1e-12


@exercise(7, eq=5)
def test_unmerge_refuses_a_row_that_merge_erased(dora):
    """A row with m = 0 merged to zeros: its W0 is lost, and unmerge must say so."""
    W0, A, B = np.ones((2, 3)), np.ones((1, 3)), np.ones((2, 1))
    m = np.array([0.0, 1.0])
    with pytest.raises(ValueError):
        dora.unmerge(m[:, None] * W0, A, B, m, 1.0, np.array([2.0, 2.0]))


# --- Exercise 8: magnitude_grad (Eq. 7) -------------------------------------------------------

@exercise(8, eq=7)
@given(problems())
def test_magnitude_grad_is_eq7(dora, p):
    """Eq. 7: ∂L/∂m_j = (∂L/∂W'_j · V'_j)/‖V'_j‖, here with ∂L/∂W' = G^T x."""
    V = adapted(p)
    x2, G = p.x.reshape(-1, p.x.shape[-1]), p.grad_y.reshape(-1, p.grad_y.shape[-1])
    expected = np.sum(G * (x2 @ V.T), axis=0) / norms(V)  # Σ_t G_tj (x V'^T)_tj / ‖V'_j‖
    assert rel_error(dora.magnitude_grad(V, G.T @ x2), expected) < 1e-12


# --- Exercise 9: adapted_weight_grad (Eq. 6 and 11) -------------------------------------------

@exercise(9, eq=6)
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


@exercise(9, eq=11)
@given(problems())
def test_detached_gradient_wrt_V_is_the_scaled_gradient_wrt_W(dora, p):
    """Eq. 11: with ‖V'‖_c treated as a constant, ∂L/∂V' = (m/‖V'‖_c) ∂L/∂W'."""
    V = adapted(p)
    grad_W = np.random.default_rng(1).standard_normal(V.shape)
    expected = (p.m / norms(V))[:, None] * grad_W
    assert rel_error(dora.adapted_weight_grad(V, p.m, grad_W, detach_norm=True), expected) < 1e-14


# --- Exercise 10: backward (Eq. 6, 7 and 11) --------------------------------------------------

def loss_exact(p):
    """L = Σ grad_y ⊙ y, with y = x W'^T + b and the norm a function of A and B."""
    def loss():
        return np.sum(p.grad_y * (p.x @ merged(p).T))
    return loss


def loss_detached(p):
    """The same loss with ‖V'‖_c frozen at its current value: a constant, as Eq. 11 treats it."""
    frozen = norms(adapted(p))

    def loss():
        return np.sum(p.grad_y * (p.x @ adapted(p).T) * (p.m / frozen))
    return loss


@exercise(10)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached-Eq11", "exact-Eq6"])
@given(p=problems(max_dim=4, max_rank=3, batch_dims=(1, 2), scales=(-1, 1)))
def test_backward_equals_centred_finite_differences(dora, p, detach_norm):
    loss = loss_detached(p) if detach_norm else loss_exact(p)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    assert set(grads) == {"x", "A", "B", "m"}
    terms = p.grad_y * (p.x @ adapted(p).T)
    for name, array in [("x", p.x), ("A", p.A), ("B", p.B), ("m", p.m)]:
        assert grads[name].shape == array.shape, f"∂L/∂{name}: shape"
        error = gradient_error(grads[name], loss, array, terms)
        assert error < 1e-6, f"∂L/∂{name}: relative error {error:.2g} against finite differences"


@exercise(10, eq=7)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@given(p=problems())
def test_backward_magnitude_gradient_is_eq7_in_both_modes(dora, p, detach_norm):
    """Eq. 7: ∂L/∂m_j = Σ_t G_tj (x V'^T)_tj / ‖V'_j‖, whether the norm is detached or not."""
    V = adapted(p)
    x2, G = p.x.reshape(-1, p.x.shape[-1]), p.grad_y.reshape(-1, p.grad_y.shape[-1])
    expected = np.sum(G * (x2 @ V.T), axis=0) / norms(V)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    assert rel_error(grads["m"], expected) < 1e-12


@exercise(10)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached-Eq11", "exact-Eq6"])
@given(p=problems(batch_dims=(1, 2)), row=st.integers(0, 5))
def test_backward_of_a_zero_row_is_finite_and_leaves_the_unit_dead(dora, p, detach_norm, row):
    """Zero-row rule: every gradient is finite, and the dead unit's magnitude gets none."""
    row = with_zero_row(p, row)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert grads["m"][row] == 0


@exercise(10, eq=11)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_backward_agrees_with_peft_golden_vectors(dora, case):
    """PEFT detaches the norm (Eq. 11)."""
    args, g = golden_args(case)
    grads = dora.backward(*args, g["grad_y"], detach_norm=True)
    for name, key in [("x", "grad_x"), ("A", "grad_lora_A"), ("B", "grad_lora_B"),
                      ("m", "grad_magnitude")]:
        assert rel_error(grads[name], g[key]) < 1e-13, f"∂L/∂{name} differs from PEFT's"
