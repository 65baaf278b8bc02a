"""Shared test tools: the relative error, centred finite differences, random DoRA problems, the
list of the exercises, and the verdict a wrong answer gets.

    problems(...)      a hypothesis strategy of DoRA problems (NumPy arrays), for the NumPy and
                       the PyTorch tests; each output row positive, negative, erased or dead
    check(...)         compare a result with its expected value; raise WrongAnswer, a short
                       message for a learner (the quantity, its equation, a few entries)
"""

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

# Exercise n of tutorial/exercises/dora.py is the function EXERCISES[n - 1], taught in the chapter
# tutorial/CHAPTERS[n - 1].md.
EXERCISES = ["row_norm", "decompose", "adapt", "recombine", "forward",
             "merge", "unmerge", "magnitude_grad", "adapted_weight_grad", "backward"]
CHAPTERS = ["01_decompose", "01_decompose", "02_adapt", "03_recombine", "03_recombine",
            "04_merge", "04_merge", "05_gradients", "05_gradients", "05_gradients"]
# Optional steps, graded like the exercises but run only when asked for by name
# (--exercise 1b): {step: (the function it improves, its chapter)}. Step 1b makes exercise 1's
# row_norm safe from overflow and underflow; the other tests never need it.
OPTIONAL_STEPS = {"1b": ("row_norm", "01_decompose")}
# Exercises 11-13, of tutorial/exercises/dora_torch.py: the PyTorch core's scale, forward and
# backward (dora_minimal.core.DoRAFunction), checked by tests/test_torch_exercises.py, taught in
# chapter 6.
TORCH_EXERCISES = ["scale_forward", "scale_backward", "norm_path_backward"]
TORCH_CHAPTERS = ["06_pytorch", "06_pytorch", "06_pytorch"]


# --- The verdict a wrong answer gets ---------------------------------------------------------

class WrongAnswer(AssertionError):
    """A test's prepared message for a learner: which quantity is wrong, its equation, shapes or
    dtypes, a few entries. `equation` is the paper's equation number of that quantity (the
    exercise's footer cites it), or None."""

    def __init__(self, message, equation=None):
        super().__init__(message)
        self.equation = equation


# The example a failing test ran on, in words (its sizes): set by the strategies that draw one
# (problems, and the layers of tests/test_torch_exercises.py), read by conftest.py's report.
EXAMPLE = {"sizes": None}


def note_example(sizes):
    EXAMPLE["sizes"] = sizes


def as_numpy(a):
    """A NumPy array of float64 (or the array's own kind if not floating) from a NumPy array, a
    number or a torch tensor (of any dtype, bf16 included), and the name of its dtype."""
    if hasattr(a, "detach"):  # a torch tensor; torch is not imported here
        dtype = str(a.dtype).removeprefix("torch.")
        a = a.detach().cpu()
        return (a.double() if a.is_floating_point() else a).numpy(), dtype
    a = np.asarray(a)
    return (a.astype(np.float64) if a.dtype.kind == "f" else a), str(a.dtype)


def entries(ours, expected, count=4):
    """Up to `count` lines `index  yours  expected  yours/expected`, the entries that differ the
    most, in index order (a sign error shows a ratio of -1)."""
    difference = np.abs(ours - expected).ravel()
    shown = np.sort(np.argsort(-difference, kind="stable")[:count])
    lines = [f"    {'entry':<10} {'yours':>12} {'expected':>12} {'yours/expected':>15}"]
    for flat in shown:
        index = np.unravel_index(flat, ours.shape)
        a, b = ours.flat[flat], expected.flat[flat]
        ratio = "-" if b == 0 else f"{a / b:.3g}"
        label = "[" + ", ".join(map(str, index)) + "]"
        lines.append(f"    {label:<10} {a:>12.4g} {b:>12.4g} {ratio:>15}")
    if ours.size > count:
        lines.append(f"    ({ours.size - count} more entries; these differ the most)")
    return lines


def values(a, count=4):
    flat = a.ravel()
    text = ", ".join(f"{v:.4g}" for v in flat[:count])
    return f"[{text}{', ...' if flat.size > count else ''}]"


def entrywise_error(ours, expected):
    """max over entries of |ours - expected| / |expected| (0 where both are 0, inf where only
    expected is), as numpy.testing.assert_allclose(rtol=...) measures."""
    difference = np.abs(ours - expected)
    size = np.abs(expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(difference == 0, 0.0, difference / size)
    return float(np.max(np.where(np.isnan(ratios), np.inf, ratios), initial=0.0))


def check(quantity, ours, expected, tolerance, *, equation=None, formula=None, against=None,
          dtype=None, scale=0.0, entrywise=False):
    """Raise WrongAnswer unless `ours` has the shape of `expected` (and `dtype`, if given) and
    rel_error(ours, expected, scale) < tolerance (or, if entrywise, every entry within
    `tolerance` of its expected value, relative to it; if tolerance is None, only the shape and
    dtype are checked). The message names the quantity ("∂L/∂m"),
    cites its equation (equation=7, formula="∂L/∂m_j = ..."), says what the expected value was
    computed by (`against`), and shows the entries that differ the most, yours vs expected.
    Takes NumPy arrays or torch tensors."""
    __tracebackhide__ = True
    ours, our_dtype = as_numpy(ours)
    expected, _ = as_numpy(expected)
    where = "" if equation is None else f"Eq. {equation}: "
    cite = [] if formula is None else [f"  {where}{formula}"]
    if ours.shape != expected.shape:
        raise WrongAnswer("\n".join([
            f"{quantity} has the wrong shape: expected {expected.shape}, got {ours.shape}", *cite,
            f"  yours:    {values(ours)}", f"  expected: {values(expected)}"]), equation)
    if dtype is not None and our_dtype != dtype:
        raise WrongAnswer("\n".join([
            f"{quantity} has the wrong dtype: expected {dtype}, got {our_dtype}", *cite]),
            equation)
    if tolerance is None:  # the shape and dtype only
        return
    if entrywise:
        error = entrywise_error(ours, expected)
        wrong, kind = not error <= tolerance, "relative error (entry by entry)"
    else:
        error = rel_error(ours, expected, scale)
        wrong, kind = not error < tolerance, "relative error"  # NaN is wrong too
    if wrong:
        by = "" if against is None else f" against {against}"
        raise WrongAnswer("\n".join([
            f"{quantity} is wrong: {kind} {error:.2g}{by} (at most {tolerance:g})",
            *cite, *entries(ours, expected)]), equation)


def fail(message, equation=None):
    """Raise WrongAnswer with a message of the test's own (a property that does not hold)."""
    __tracebackhide__ = True
    raise WrongAnswer(message, equation)


def natural_row_norm(W):
    """Exercise 1 as a learner first writes it: the equation, with no care for range. Correct
    DoRA; it passes every test but those of the optional step 1b."""
    return np.sqrt(np.sum(W**2, axis=1))


def rel_error(a, b, scale=0.0):
    """cs231n's relative error, taken over the whole array: max|a-b| / max(1e-8, max|a| + max|b|).

    Taking the maxima over the whole array (not entry by entry) keeps entries that are exactly
    zero in one and round-off in the other from dominating. `scale`, when given, is the size of
    the terms that a and b were summed from: a difference that cancels to ~0 is then measured
    against the terms, whose round-off it carries.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))
                 / max(1e-8, np.max(np.abs(a)) + np.max(np.abs(b)), scale))


def numerical_gradient(f, p, h=1e-6):
    """Centred finite differences of the scalar f() with respect to every entry of the array p.

    f reads p, which is perturbed in place and restored: (f(p + h) - f(p - h)) / 2h per entry.
    The step h is relative to the size of p's entries. Returns (gradient, step).
    """
    largest = float(np.max(np.abs(p))) if p.size else 0.0
    step = h * (largest if largest > 0 else 1.0)
    grad = np.zeros_like(p)
    for index in np.ndindex(p.shape):
        saved = p[index]
        p[index] = saved + step
        plus = f()
        p[index] = saved - step
        minus = f()
        p[index] = saved
        grad[index] = (plus - minus) / (2 * step)
    return grad, step


def gradient_error(analytic, f, p, loss_terms):
    """rel_error between `analytic` and finite differences of f = Σ loss_terms w.r.t. p, with
    differences below the round-off of the finite differences (≈ eps·Σ|loss_terms| / step,
    taken 100 times over) counted as zero."""
    numeric, step = numerical_gradient(f, p)
    round_off = 1e-14 * (1.0 + float(np.sum(np.abs(loss_terms)))) / step
    difference = np.max(np.abs(analytic - numeric), initial=0.0)
    if difference <= round_off:
        return 0.0
    return rel_error(analytic, numeric)


def check_gradient(quantity, analytic, f, p, loss_terms, tolerance, *, equation=None,
                   formula=None):
    """helpers.check of `analytic` against centred finite differences of f w.r.t. p, with
    gradient_error's allowance for their round-off."""
    __tracebackhide__ = True
    check(quantity, analytic, p, None)  # its shape first
    numeric, step = numerical_gradient(f, p)
    round_off = 1e-14 * (1.0 + float(np.sum(np.abs(loss_terms)))) / step
    if np.max(np.abs(analytic - numeric), initial=0.0) <= round_off:
        return
    check(quantity, analytic, numeric, tolerance, equation=equation, formula=formula,
          against="finite differences")


# The kinds of output rows `problems` draws, each row its own (see `problems`); by default all
# but dead units, whose V'_j = 0 makes a test's own m·V'/‖V'‖_c 0/0 unless it applies the
# zero-row rule (as tests/test_reference.py does: it draws them all).
ROW_KINDS = ("positive", "negative", "erased", "dead")
DEFAULT_ROWS = ("positive", "negative", "erased")


@dataclass
class Problem:
    """One DoRA layer and its input: every array the public functions take (NumPy arrays)."""
    x: np.ndarray       # (..., in)
    W0: np.ndarray      # (out, in)
    A: np.ndarray       # (r, in)
    B: np.ndarray       # (out, r)
    m: np.ndarray       # (out,)
    bias: np.ndarray    # (out,) or None
    grad_y: np.ndarray  # (..., out)
    scaling: float
    rows: tuple = ()    # (out,): the kind of each output row, one of ROW_KINDS

    @property
    def shapes(self):
        return dict(out=self.W0.shape[0], inp=self.W0.shape[1], r=self.A.shape[0])

    def sizes(self):
        """The example in words: 'out=2, in=3, r=1, x (4, 3), scaling 0.5, float64, m's rows
        positive, negative, no bias'."""
        return (f"out={self.W0.shape[0]}, in={self.W0.shape[1]}, r={self.A.shape[0]}, "
                f"x {self.x.shape}, scaling {self.scaling:g}, {self.W0.dtype}, rows "
                f"{', '.join(self.rows)}, {'no bias' if self.bias is None else 'a bias'}")

    def rows_of(self, *kinds):
        """The indices of the rows of these kinds, e.g. p.rows_of("erased")."""
        return [j for j, kind in enumerate(self.rows) if kind in kinds]


@st.composite
def problems(draw, max_dim=6, max_rank=5, batch_dims=(0, 2), scales=(-3, 3), dtype=np.float64,
             min_tokens=0, rows=DEFAULT_ROWS):
    """A random DoRA problem: small shapes (r from 1, any batch rank, possibly no token), and each
    array at its own scale 10^k with k drawn from `scales` (values over orders of magnitude).

    Each output row j is of a kind drawn from `rows` (a subset of ROW_KINDS; hypothesis shrinks
    towards the first one):
      "positive"  m_j = ‖W0_j‖ · u, u drawn from [0.5, 2], as after some training;
      "negative"  m_j = -‖W0_j‖ · u: the magnitude is trained and can cross zero, and then
                  W'_j = m_j V'_j/‖V'_j‖ points against V'_j;
      "erased"    m_j = 0 exactly, V'_j non-zero: merge writes a zero row, which unmerge cannot
                  undo;
      "dead"      W0_j = 0, B_j = 0 and m_j = 0: a dead unit, as decompose leaves a zero row of
                  W0 at initialization; V'_j = 0 has no direction, and the zero-row rule applies.
    The default, DEFAULT_ROWS, leaves dead units out; rows=ROW_KINDS draws them too, and
    rows=("positive",) what the generator drew before magnitudes could be negative or zero.
    Every array is a NumPy array of `dtype` (scaling is a float): a PyTorch test converts them,
    e.g. torch.from_numpy(p.W0). `p.rows` holds each row's kind, `p.rows_of(kind, ...)` their
    indices.
    """
    unknown = set(rows) - set(ROW_KINDS)
    if not rows or unknown:
        raise ValueError(f"rows: expected kinds among {ROW_KINDS}, got {rows}")
    out_features = draw(st.integers(1, max_dim), label="out")
    # in = 1 last: hypothesis shrinks towards the first sizes, and with one input the exact
    # gradient of V' is 0 (a row of one entry has no direction to turn), so a shrunk example
    # would hide a mistake in it; in = 1 is still drawn, and kept if only it fails
    in_features = draw(st.sampled_from([*range(2, max_dim + 1), 1]), label="in")
    r = draw(st.integers(1, max_rank), label="r")
    batch = tuple(draw(st.lists(st.integers(min_tokens, 3), min_size=batch_dims[0],
                                max_size=batch_dims[1]), label="batch"))
    scaling = draw(st.sampled_from([0.5, 1.0, 2.0, 16.0 / r]), label="scaling")
    kinds = tuple(draw(st.lists(st.sampled_from(rows), min_size=out_features,
                                max_size=out_features), label="rows"))
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    exponent = st.integers(*scales)
    rng = np.random.default_rng(seed)

    def array(*shape):
        return (rng.standard_normal(shape) * 10.0 ** draw(exponent)).astype(dtype)

    W0 = array(out_features, in_features)
    A = array(r, in_features)
    # B at a scale tied to W0's so that s·B A is an update, not a replacement of W0
    B = (rng.standard_normal((out_features, r)) * np.abs(W0).max()
         / max(np.abs(A).max() * scaling * r, 1e-300)).astype(dtype)
    # the magnitude: ‖W0_j‖ times a factor of either sign, or 0
    sign = np.array([{"positive": 1.0, "negative": -1.0}.get(kind, 0.0) for kind in kinds])
    m = (np.linalg.norm(W0.astype(np.float64), axis=1) * rng.uniform(0.5, 2.0, out_features)
         * sign).astype(dtype)
    dead = [j for j, kind in enumerate(kinds) if kind == "dead"]
    W0[dead], B[dead] = 0, 0
    bias = array(out_features) if draw(st.booleans(), label="bias") else None
    problem = Problem(x=array(*batch, in_features), W0=W0, A=A, B=B, m=m, bias=bias,
                      grad_y=array(*batch, out_features), scaling=scaling, rows=kinds)
    note_example(problem.sizes())
    return problem
