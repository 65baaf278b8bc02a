"""Property tests of DoRA's four steps and their gradients, one equation of the paper per test.

They check `dora`, the module chosen by --impl: dora_minimal.reference by default, your solutions
in tutorial/exercises/dora.py with `--impl=exercises`, or a file of yours with `--impl=PATH.py`.
Every test is marked with the exercise that makes it runnable (it calls exercises up to that one)
and the equation it checks; `--exercise N` runs the tests of exercises 1..N (see conftest.py).
Every expected value is computed here independently, with plain NumPy, from the equations.

The problems have output rows of four kinds (helpers.problems): magnitudes of either sign, rows
erased by a magnitude of exactly 0, and dead units (a zero row of W0 and of B, m = 0), so every
property holds for them too. Exercise 1's tests need only the equation; making row_norm safe from
overflow and underflow is the optional step 1b (--exercise 1b).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import helpers
from helpers import ROW_KINDS, check, check_gradient, fail

DATA = Path(__file__).parent / "data"


def problems(**options):
    """helpers.problems with output rows of every kind (positive, negative, erased, dead)
    unless `rows` says otherwise."""
    return helpers.problems(**{"rows": ROW_KINDS, **options})


# Each quantity's equation, as a failing test cites it: (the paper's equation number, formula).
NORM = (2, "‖W‖_c (out,): the L2 norm of each output row of W (out, in)")
MAGNITUDE = (2, "m = ‖W‖_c (out,)")
DIRECTION = (2, "direction = W/‖W‖_c (out, in): unit rows (a zero row: zeros)")
ADAPTED = (5, "V' = W0 + s·B A (out, in)")
MERGED = (5, "W' = m · V'/‖V'‖_c (out, in), V' = W0 + s·B A; row j has length |m_j|")
OUTPUT = (5, "y = (m/‖V'‖_c) ⊙ (x W0^T + s·(x A^T) B^T) + b (..., out)")
UNMERGED = (5, "solved for W0: W0 = W' ‖V'‖_c/m - s·B A (out, in)")
GRAD_M = (7, "∂L/∂m_j = (∂L/∂W'_j · V'_j)/‖V'_j‖, with ∂L/∂W' = G^T x (out,)")
GRAD_V_EXACT = (6, "∂L/∂V'_j = (m_j/‖V'_j‖)(I - V'_j V'_j^T/‖V'_j‖²) ∂L/∂W'_j")
GRAD_V_DETACHED = (11, "∂L/∂V' = (m/‖V'‖_c) ∂L/∂W', the norm a constant")


def grad_formulas(detach_norm):
    """{name: (equation, formula)} of backward's four gradients."""
    grad_V = "Eq. 11" if detach_norm else "Eq. 6"
    return {"x": (5, "∂L/∂x = G W' (..., in), W' = m · V'/‖V'‖_c"),
            "A": (11 if detach_norm else 6, f"∂L/∂A = s·B^T ∂L/∂V' (r, in), ∂L/∂V' by {grad_V}"),
            "B": (11 if detach_norm else 6, f"∂L/∂B = s·∂L/∂V' A^T (out, r), ∂L/∂V' by {grad_V}"),
            "m": (7, "∂L/∂m_j = Σ_t G_tj (x V'^T)_tj / ‖V'_j‖ (out,)")}


def compare(quantity, ours, expected, tolerance, cited, **options):
    """helpers.check with a quantity's (equation, formula)."""
    __tracebackhide__ = True
    check(quantity, ours, expected, tolerance, equation=cited[0], formula=cited[1], **options)


def compare_gradient(quantity, analytic, loss, array, terms, cited):
    """helpers.check_gradient (finite differences, within 1e-6) with a quantity's (equation,
    formula)."""
    __tracebackhide__ = True
    check_gradient(quantity, analytic, loss, array, terms, 1e-6, equation=cited[0],
                   formula=cited[1])


def keys(grads):
    """backward's result, checked to be a dict of the four gradients."""
    __tracebackhide__ = True
    if not isinstance(grads, dict) or set(grads) != {"x", "A", "B", "m"}:
        fail("backward must return a dict with the keys 'x', 'A', 'B', 'm', got "
             + (f"the keys {sorted(grads)}" if isinstance(grads, dict) else type(grads).__name__))
    return grads


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


def over_norms(numerator, V):
    """numerator / ‖V‖_c row by row, 0 where a row of V is 0 (the zero-row rule)."""
    n = norms(V)
    n = n.reshape(n.shape + (1,) * (np.ndim(numerator) - 1))
    return np.divide(numerator, n, out=np.zeros(np.shape(numerator)), where=n != 0)


def merged(p, m=None, B=None):
    """W' = m · V'/‖V'‖_c (Eq. 5), computed independently of the module under test."""
    m = p.m if m is None else m
    return over_norms(m[:, None] * adapted(p, B=B), adapted(p, B=B))


# rows that unmerge can undo: all but the erased ones
UNERASED = tuple(kind for kind in ROW_KINDS if kind != "erased")


def make_dead(p, row):
    """p with row `row` (modulo out) a dead unit: W0, B and m zero there."""
    row = row % p.W0.shape[0]
    p.W0[row], p.B[row], p.m[row] = 0.0, 0.0, 0.0
    return row


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
    compare("row_norm(W)", dora.row_norm(p.W0), norms(p.W0), 1e-14, NORM)


@exercise(1, eq=2)
@given(problems(dtype=np.float32))
def test_row_norm_of_float32_is_float32(dora, p):
    """Outputs come back in the input's dtype (float32 here): no silent copy to float64."""
    compare("row_norm(W) of a float32 W", dora.row_norm(p.W0), norms(p.W0.astype(np.float64)),
            1e-6, NORM, dtype="float32")


# --- Optional step 1b: row_norm safe from overflow and underflow ------------------------------

def exact_norms(W):
    """‖W‖_c by math.hypot, which neither overflows nor underflows (in float64)."""
    return np.array([math.hypot(*row) for row in W.astype(np.float64)])


@exercise("1b", eq=2)
@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_row_norm_of_huge_and_tiny_float64_rows_neither_overflows_nor_underflows(dora, scale):
    """Squares of 1e200 overflow float64 and squares of 1e-200 underflow it."""
    W = np.random.default_rng(7).standard_normal((5, 4))
    compare(f"row_norm(W) of entries about {scale:g}", dora.row_norm(W * scale),
            norms(W) * scale, 1e-14, NORM, entrywise=True)


@exercise("1b", eq=2)
def test_row_norm_of_tiny_float32_weights_does_not_underflow(dora):
    """1e-30² underflows float32: squaring first would give a norm of 0."""
    W = np.full((2, 3), 1e-30, dtype=np.float32)
    compare("row_norm(W) of float32 entries 1e-30", dora.row_norm(W),
            np.full(2, np.sqrt(3) * 1e-30), 1e-6, NORM, dtype="float32", entrywise=True)


@exercise("1b", eq=2)
@pytest.mark.parametrize("dtype, largest", [(np.float64, 300), (np.float32, 37)],
                         ids=["float64", "float32"])
@given(data=st.data())
def test_row_norm_of_rows_mixing_huge_and_tiny_entries(dora, dtype, largest, data):
    """Entries from 10^-largest to 10^largest of either sign in one row, and rows of zeros:
    each row's norm is still its norm (to the dtype's precision), in the input's dtype."""
    out, inp = data.draw(st.integers(1, 5), label="out"), data.draw(st.integers(1, 5), label="in")
    exponents = data.draw(st.lists(st.integers(-largest, largest), min_size=out * inp,
                                   max_size=out * inp), label="exponents")
    signs = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=out * inp,
                               max_size=out * inp), label="signs")
    W = (np.array(signs) * 10.0 ** np.array(exponents, dtype=np.float64)).reshape(out, inp)
    W = W.astype(dtype)
    compare("row_norm(W) of rows mixing huge and tiny entries", dora.row_norm(W),
            exact_norms(W), 1e-14 if dtype == np.float64 else 1e-6, NORM,
            dtype=np.dtype(dtype).name, entrywise=True)


# --- Exercise 2: decompose (Eq. 2) ------------------------------------------------------------

@exercise(2, eq=2)
@given(problems())
def test_decompose_reconstructs_W_from_magnitude_and_unit_rows(dora, p):
    """Eq. 2: W0 = m · V/‖V‖_c with m = ‖W0‖_c; the direction has unit rows (zero rows, such
    as a dead unit's, have a zero direction)."""
    m, direction = dora.decompose(p.W0)
    compare("m, decompose's first result", m, norms(p.W0), 1e-14, MAGNITUDE)
    compare("direction, decompose's second result", direction, over_norms(p.W0, p.W0), 1e-14,
            DIRECTION)


@exercise(2, eq=2)
@given(problems(dtype=np.float32))
def test_decompose_of_float32_is_float32(dora, p):
    m, direction = dora.decompose(p.W0)
    W = p.W0.astype(np.float64)
    compare("m, decompose's first result", m, norms(W), 1e-6, MAGNITUDE, dtype="float32")
    compare("direction, decompose's second result", direction, over_norms(W, W), 1e-6,
            DIRECTION, dtype="float32")


@exercise(2, eq=2)
@given(p=problems(), row=st.integers(0, 5))
def test_decompose_gives_a_zero_row_a_zero_direction(dora, p, row):
    """Zero-row rule: a row of zeros has magnitude 0 and direction 0, not 0/0 = NaN."""
    row = with_zero_row(p, row)
    m, direction = dora.decompose(p.W0)
    compare(f"m of zero row {row}", m[row], 0.0, 1e-300, MAGNITUDE)
    compare(f"direction of zero row {row} (x / 0 counts as 0)", direction[row],
            np.zeros_like(p.W0[row]), 1e-300, DIRECTION)


# --- Exercise 3: adapt (Eq. 5) ----------------------------------------------------------------

@exercise(3, eq=5)
@given(problems())
def test_adapt_adds_the_scaled_low_rank_update(dora, p):
    """Eq. 5: V' = W0 + s·B A, here as a sum of r outer products."""
    update = sum(np.outer(p.B[:, k], p.A[k]) for k in range(p.A.shape[0]))
    compare("V', adapt's result", dora.adapt(p.W0, p.A, p.B, p.scaling),
            p.W0 + p.scaling * update, 1e-14, ADAPTED)


# --- Exercise 4: recombine (Eq. 5) ------------------------------------------------------------

@exercise(4, eq=5)
@given(problems())
def test_recombine_gives_rows_of_norm_abs_m(dora, p):
    """Eq. 5: W' = m · V'/‖V'‖_c, so ‖W'‖_c = |m| row by row (0 for a dead unit)."""
    W = dora.recombine(p.m, adapted(p))
    compare("the row norms of W' = recombine(m, V')", norms(W), np.abs(p.m), 1e-13, MERGED,
            entrywise=True)


@exercise(4, eq=5)
@given(problems())
def test_recombine_points_each_row_along_V_for_positive_m_and_against_it_for_negative_m(dora, p):
    """Eq. 5 with m of either sign: W'_j = m_j V'_j/‖V'_j‖, so W'_j · V'_j = m_j ‖V'_j‖. The
    magnitude is trained and can cross zero; taking |m| would turn such a row around."""
    V = adapted(p)
    W = dora.recombine(p.m, V)
    compare("W', recombine's result", W, merged(p), 1e-13, MERGED)
    compare("W'_j · V'_j row by row, for W' = recombine(m, V')", np.sum(W * V, axis=1),
            p.m * norms(V), 1e-12, (5, "W'_j · V'_j = m_j ‖V'_j‖: along V'_j if m_j > 0, "
                                       "against it if m_j < 0"), entrywise=True)


@exercise(4, eq=5)
@given(problems(dtype=np.float32))
def test_recombine_of_float32_is_float32(dora, p):
    compare("W', recombine's result", dora.recombine(p.m, adapted(p)), merged(p), 1e-5, MERGED,
            dtype="float32")


@exercise(4, eq=5)
@given(problems(), st.data())
def test_recombine_ignores_the_length_of_each_row_of_V(dora, p, data):
    """Eq. 5: only the direction of each row of V' matters: rescaling a row by a positive factor
    leaves W' unchanged."""
    factors = np.array(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=len(p.m),
                                          max_size=len(p.m))))
    V = adapted(p)
    compare("W' = recombine(m, V') with the rows of V' rescaled",
            dora.recombine(p.m, factors[:, None] * V), merged(p), 1e-13, MERGED)


# --- Exercise 5: forward (Eq. 5) --------------------------------------------------------------

@exercise(5, eq=5)
@given(problems())
def test_forward_equals_the_linear_map_with_the_merged_weight(dora, p):
    """y = (m/‖V'‖_c) ⊙ (x W0^T + s (x A^T) B^T) + b equals x W'^T + b."""
    expected = p.x @ merged(p).T + (0 if p.bias is None else p.bias)
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    compare("y, forward's result", y, expected, 1e-12, OUTPUT,
            against="x W'^T + b with W' = m · V'/‖V'‖_c")


@exercise(5, eq=5)
@given(problems(dtype=np.float32, min_tokens=1))
def test_forward_of_float32_is_float32(dora, p):
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    expected = p.x @ merged(p).T + (0 if p.bias is None else p.bias)
    terms = np.abs(p.x) @ np.abs(merged(p)).T  # the round-off of float32 is relative to these
    compare("y, forward's result for float32 inputs", y, expected, 1e-5, OUTPUT,
            dtype="float32", scale=np.max(terms, initial=0))


@exercise(5, eq=5)
@given(problems())
def test_forward_at_init_is_the_plain_linear_map(dora, p):
    """B = 0 and m = ‖W0‖_c: the adapted layer is the pretrained layer."""
    B0, m0 = np.zeros_like(p.B), norms(p.W0)
    expected = p.x @ p.W0.T + (0 if p.bias is None else p.bias)
    compare("y, forward's result with B = 0 and m = ‖W0‖_c",
            dora.forward(p.x, p.W0, p.A, B0, m0, p.scaling, p.bias), expected, 1e-13, OUTPUT,
            against="x W0^T + b")


@exercise(5, eq=5)
@given(p=problems(batch_dims=(1, 2)), row=st.integers(0, 5))
def test_forward_of_a_zero_row_outputs_the_bias(dora, p, row):
    """Zero-row rule: a row of V' that is exactly 0 has scale 0; the unit outputs its bias."""
    row = with_zero_row(p, row)
    y = dora.forward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.bias)
    bias = 0.0 if p.bias is None else p.bias[row]
    compare(f"y[..., {row}] of zero row {row} of V' (its bias: x / 0 counts as 0)", y[..., row],
            np.full(p.x.shape[:-1], bias), 1e-300, OUTPUT)
    compare("y, forward's result", y, p.x @ merged(p).T + (0 if p.bias is None else p.bias),
            1e-12, OUTPUT)


@exercise(5, eq=5)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_forward_agrees_with_peft_golden_vectors(dora, case):
    args, g = golden_args(case)
    compare("y, forward's result", dora.forward(*args, bias=g.get("bias")), g["y"], 1e-13,
            OUTPUT, against="Hugging Face PEFT's")


# --- Exercise 6: merge (Eq. 5) ----------------------------------------------------------------

@exercise(6, eq=5)
@given(problems())
def test_merge_is_m_times_the_unit_rows_of_V(dora, p):
    compare("W', merge's result", dora.merge(p.W0, p.A, p.B, p.m, p.scaling), merged(p), 1e-13,
            MERGED)


@exercise(6, eq=5)
@given(problems())
def test_merge_at_init_returns_W0(dora, p):
    """B = 0 and m = ‖W0‖_c: the merged weight is the pretrained weight."""
    B0, m0 = np.zeros_like(p.B), norms(p.W0)
    compare("W', merge's result with B = 0 and m = ‖W0‖_c",
            dora.merge(p.W0, p.A, B0, m0, p.scaling), p.W0, 1e-14, MERGED, against="W0")


@exercise(6, eq=5)
@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1.0, 1e10, 1e20])
def test_merge_of_extreme_weight_scales_does_not_overflow(dora, scale):
    rng = np.random.default_rng(7)
    W0, A = rng.standard_normal((5, 4)) * scale, rng.standard_normal((2, 4))
    B = rng.standard_normal((5, 2)) * scale
    m = norms(W0 / scale) * scale * 1.5
    W = dora.merge(W0, A, B, m, 2.0)
    compare(f"the row norms of W', merge's result for weights about {scale:g}",
            norms(W / scale) * scale, m, 1e-13, MERGED, entrywise=True)


@exercise(6, eq=5)
@given(p=problems(), row=st.integers(0, 5))
def test_merge_of_a_zero_row_is_a_zero_row(dora, p, row):
    """Zero-row rule: a row of V' that is exactly 0 gives a row of W' that is 0, not NaN."""
    row = with_zero_row(p, row)
    W = dora.merge(p.W0, p.A, p.B, p.m, p.scaling)
    compare(f"row {row} of W', a zero row of V' (x / 0 counts as 0)", W[row],
            np.zeros_like(p.W0[row]), 1e-300, MERGED)
    compare("W', merge's result", W, merged(p), 1e-13, MERGED)


@exercise(6, eq=5)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_merge_agrees_with_peft_golden_vectors(dora, case):
    args, g = golden_args(case)
    compare("W', merge's result", dora.merge(*args[1:]), g["merged_weight"], 1e-13, MERGED,
            against="Hugging Face PEFT's")


# --- Exercise 7: unmerge (Eq. 5 solved for W0) ------------------------------------------------

@exercise(7, eq=5)
@given(problems(rows=UNERASED))
def test_unmerge_of_merge_returns_W0(dora, p):
    """W0 = W' ‖V'‖_c / m - s·B A, with the norm stored at merge time (float64: <= 1e-12), for
    m of either sign and for dead units."""
    restored = dora.unmerge(merged(p), p.A, p.B, p.m, p.scaling, norms(adapted(p)))
    compare("W0, unmerge's result", restored, p.W0, 1e-12, UNMERGED)


@exercise(7, eq=5)
@given(p=problems(rows=UNERASED), row=st.integers(0, 5))
def test_unmerge_of_a_dead_unit_returns_its_zero_row(dora, p, row):
    """A dead unit (W0_j = 0, B_j = 0, so ‖V'_j‖ = 0, and m_j = 0) merges to a zero row and
    unmerges to W0_j = V'_j - s·B_j A = 0 - 0 = 0: ‖V'_j‖/m_j = 0/0 must count as 0 (the zero-row
    rule), and the unit is not erased (nothing was lost)."""
    row = make_dead(p, row)
    restored = dora.unmerge(merged(p), p.A, p.B, p.m, p.scaling, norms(adapted(p)))
    compare(f"row {row} of W0, a dead unit (‖V'‖/m = 0/0 counts as 0)", restored[row],
            np.zeros_like(p.W0[row]), 1e-300, UNMERGED)
    compare("W0, unmerge's result", restored, p.W0, 1e-12, UNMERGED)


@exercise(7, eq=5)
@given(p=problems(rows=UNERASED), row=st.integers(0, 5))
def test_unmerge_refuses_a_row_that_merge_erased(dora, p, row):
    """A row with m = 0 and ‖V'‖ > 0 merged to zeros: its W0 is lost, and unmerge must say so,
    whatever the other rows' magnitudes (of either sign, dead units too)."""
    row = row % p.W0.shape[0]
    if not np.any(p.W0[row]):
        p.W0[row] = p.A[0]  # a dead unit's W0 is 0: a row at a drawn scale instead
    p.m[row] = 0.0
    assume(np.any(adapted(p)[row]))  # V'_j is not 0 (at any scale)
    try:
        dora.unmerge(merged(p), p.A, p.B, p.m, p.scaling, norms(adapted(p)))
    except ValueError:
        return
    fail(f"unmerge raised no ValueError for row {row}, which merge erased (m = 0, ‖V'‖ > 0): "
         "its W0 cannot be recovered", 5)


@exercise(7, eq=5)
@given(problems(dtype=np.float32, rows=UNERASED))
def test_merge_and_unmerge_of_float32_are_float32(dora, p):
    W = dora.merge(p.W0, p.A, p.B, p.m, p.scaling)
    norm = norms(adapted(p)).astype(np.float32)
    restored = dora.unmerge(W, p.A, p.B, p.m, p.scaling, norm)
    compare("W', merge's result", W, merged(p), 1e-5, MERGED, dtype="float32")
    compare("W0, unmerge's result", restored, p.W0, 1e-4, UNMERGED, dtype="float32",
            scale=np.max(np.abs(p.scaling * p.B @ p.A)))


# --- Exercise 8: magnitude_grad (Eq. 7) -------------------------------------------------------

@exercise(8, eq=7)
@given(problems())
def test_magnitude_grad_is_eq7(dora, p):
    """Eq. 7: ∂L/∂m_j = (∂L/∂W'_j · V'_j)/‖V'_j‖, here with ∂L/∂W' = G^T x."""
    V = adapted(p)
    x2, G = p.x.reshape(-1, p.x.shape[-1]), p.grad_y.reshape(-1, p.grad_y.shape[-1])
    expected = over_norms(np.sum(G * (x2 @ V.T), axis=0), V)  # Σ_t G_tj (x V'^T)_tj / ‖V'_j‖
    compare("∂L/∂m, magnitude_grad's result", dora.magnitude_grad(V, G.T @ x2), expected, 1e-12,
            GRAD_M)


@exercise(8, eq=7)
@given(problems(dtype=np.float32))
def test_magnitude_grad_of_float32_is_float32(dora, p):
    V = adapted(p).astype(np.float32)
    grad_W = np.random.default_rng(3).standard_normal(V.shape).astype(np.float32)
    V64, grad_W64 = V.astype(np.float64), grad_W.astype(np.float64)
    compare("∂L/∂m, magnitude_grad's result for float32 inputs", dora.magnitude_grad(V, grad_W),
            over_norms(np.sum(grad_W64 * V64, axis=1), V64), 1e-5, GRAD_M, dtype="float32",
            scale=np.max(np.sum(np.abs(grad_W64 * V64), axis=1) / np.maximum(norms(V64), 1e-300),
                         initial=0.0))


# --- Exercise 9: adapted_weight_grad (Eq. 6 and 11) -------------------------------------------

@exercise(9, eq=6)
@given(problems(max_dim=4, max_rank=3, scales=(-1, 1)))
def test_exact_gradient_wrt_V_is_projected_orthogonal_to_V(dora, p):
    """Eq. 6: ∂L/∂V'_j = (m_j/‖V'_j‖)(I - V'_j V'_j^T/‖V'_j‖²) ∂L/∂W'_j is orthogonal to V'_j,
    and equals finite differences of L(V') = Σ ∂L/∂W' ⊙ W'(V')."""
    V = adapted(p)
    grad_W = np.random.default_rng(0).standard_normal(V.shape)
    grad_V = dora.adapted_weight_grad(V, p.m, grad_W, detach_norm=False)
    check("∂L/∂V', adapted_weight_grad's result", grad_V, V, None)  # its shape first
    row_dots = np.sum(grad_V * V, axis=1)
    for j in np.flatnonzero(~(np.abs(row_dots) <= 1e-12 * norms(grad_V) * norms(V) + 1e-300)):
        fail(f"∂L/∂V'_{j} · V'_{j} = {row_dots[j]:.4g}, expected 0: the exact gradient of "
             f"row {j} is orthogonal to V'_{j}\n  Eq. {GRAD_V_EXACT[0]}: {GRAD_V_EXACT[1]}", 6)

    def loss():
        return np.sum(grad_W * over_norms(p.m[:, None] * V, V))
    terms = grad_W * over_norms(p.m[:, None] * V, V)
    compare_gradient("∂L/∂V', adapted_weight_grad's result", grad_V, loss, V, terms,
                     GRAD_V_EXACT)


@exercise(9, eq=11)
@given(problems())
def test_detached_gradient_wrt_V_is_the_scaled_gradient_wrt_W(dora, p):
    """Eq. 11: with ‖V'‖_c treated as a constant, ∂L/∂V' = (m/‖V'‖_c) ∂L/∂W'."""
    V = adapted(p)
    grad_W = np.random.default_rng(1).standard_normal(V.shape)
    expected = over_norms(p.m, V)[:, None] * grad_W
    compare("∂L/∂V', adapted_weight_grad's result with detach_norm=True",
            dora.adapted_weight_grad(V, p.m, grad_W, detach_norm=True), expected, 1e-14,
            GRAD_V_DETACHED)


@exercise(9, eq=11)
@given(problems())
def test_adapted_weight_grad_detaches_the_norm_by_default(dora, p):
    """detach_norm=True is the default (the paper's §4.3, and PEFT's only mode): Eq. 11."""
    V = adapted(p)
    grad_W = np.random.default_rng(2).standard_normal(V.shape)
    expected = over_norms(p.m, V)[:, None] * grad_W
    compare("∂L/∂V', adapted_weight_grad's result without detach_norm (True by default)",
            dora.adapted_weight_grad(V, p.m, grad_W), expected, 1e-14, GRAD_V_DETACHED)


# --- Exercise 10: backward (Eq. 6, 7 and 11) --------------------------------------------------

def loss_exact(p):
    """L = Σ grad_y ⊙ y, with y = x W'^T + b and the norm a function of A and B."""
    def loss():
        return np.sum(p.grad_y * (p.x @ merged(p).T))
    return loss


def loss_detached(p):
    """The same loss with ‖V'‖_c frozen at its current value: a constant, as Eq. 11 treats it."""
    frozen = adapted(p)

    def loss():
        return np.sum(p.grad_y * (p.x @ adapted(p).T) * over_norms(p.m, frozen))
    return loss


@exercise(10)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached-Eq11", "exact-Eq6"])
@given(p=problems(max_dim=4, max_rank=3, batch_dims=(1, 2), scales=(-1, 1)))
def test_backward_equals_centred_finite_differences(dora, p, detach_norm):
    loss = loss_detached(p) if detach_norm else loss_exact(p)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    keys(grads)
    terms = p.grad_y * (p.x @ adapted(p).T)
    for name, array in [("x", p.x), ("A", p.A), ("B", p.B), ("m", p.m)]:
        compare_gradient(f"∂L/∂{name}, backward's {name!r}", grads[name], loss, array, terms,
                         grad_formulas(detach_norm)[name])


@exercise(10, eq=7)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@given(p=problems())
def test_backward_magnitude_gradient_is_eq7_in_both_modes(dora, p, detach_norm):
    """Eq. 7: ∂L/∂m_j = Σ_t G_tj (x V'^T)_tj / ‖V'_j‖, whether the norm is detached or not."""
    V = adapted(p)
    x2, G = p.x.reshape(-1, p.x.shape[-1]), p.grad_y.reshape(-1, p.grad_y.shape[-1])
    expected = over_norms(np.sum(G * (x2 @ V.T), axis=0), V)
    grads = dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y, detach_norm=detach_norm)
    compare("∂L/∂m, backward's 'm'", keys(grads)["m"], expected, 1e-12, GRAD_M)


def detached_gradients(p):
    """Eq. 7 and 11 written out: ∂L/∂x, ∂L/∂A, ∂L/∂B, ∂L/∂m with ‖V'‖_c a constant."""
    x2, G = p.x.reshape(-1, p.x.shape[-1]), p.grad_y.reshape(-1, p.grad_y.shape[-1])
    V = adapted(p)
    grad_W = G.T @ x2  # (out, in)
    grad_V = over_norms(p.m, V)[:, None] * grad_W  # Eq. 11
    return {"x": (G @ merged(p)).reshape(p.x.shape), "A": p.scaling * p.B.T @ grad_V,
            "B": p.scaling * grad_V @ p.A.T, "m": over_norms(np.sum(grad_W * V, axis=1), V)}


@exercise(10, eq=11)
@given(problems(min_tokens=1))
def test_backward_detaches_the_norm_by_default(dora, p):
    """detach_norm=True is the default (the paper's §4.3, and PEFT's only mode): Eq. 11."""
    grads = keys(dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y))
    for name, expected in detached_gradients(p).items():
        compare(f"∂L/∂{name}, backward's {name!r} without detach_norm (True by default)",
                grads[name], expected, 1e-12, grad_formulas(True)[name])


@exercise(10)
@given(problems(dtype=np.float32, min_tokens=1, scales=(-1, 1)))
def test_backward_of_float32_is_float32(dora, p):
    grads = keys(dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y))
    expected = detached_gradients(p)
    for name in expected:
        compare(f"∂L/∂{name}, backward's {name!r} for float32 inputs", grads[name],
                expected[name], 1e-4, grad_formulas(True)[name], dtype="float32")


@exercise(10)
@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached-Eq11", "exact-Eq6"])
@given(p=problems(batch_dims=(1, 2)), row=st.integers(0, 5))
def test_backward_of_a_zero_row_is_finite_and_leaves_the_unit_dead(dora, p, detach_norm, row):
    """Zero-row rule: every gradient is finite, and the dead unit's magnitude gets none."""
    row = with_zero_row(p, row)
    grads = keys(dora.backward(p.x, p.W0, p.A, p.B, p.m, p.scaling, p.grad_y,
                               detach_norm=detach_norm))
    for name, grad in grads.items():
        if not np.all(np.isfinite(grad)):
            fail(f"∂L/∂{name}, backward's {name!r}, is not finite where row {row} of V' is 0: "
                 f"{np.asarray(grad).ravel()[:4]} (x / 0 counts as 0)",
                 grad_formulas(True)[name][0])
    compare(f"∂L/∂m of zero row {row} of V'", grads["m"][row], 0.0, 1e-300, GRAD_M)


@exercise(10, eq=11)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_backward_agrees_with_peft_golden_vectors(dora, case):
    """PEFT detaches the norm (Eq. 11)."""
    args, g = golden_args(case)
    grads = keys(dora.backward(*args, g["grad_y"], detach_norm=True))
    for name, key in [("x", "grad_x"), ("A", "grad_lora_A"), ("B", "grad_lora_B"),
                      ("m", "grad_magnitude")]:
        compare(f"∂L/∂{name}, backward's {name!r}", grads[name], g[key], 1e-13,
                grad_formulas(True)[name], against="Hugging Face PEFT's")
