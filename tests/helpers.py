"""Shared test tools: the relative error, centred finite differences, random DoRA problems, and
the list of the exercises.

    problems(...)      a hypothesis strategy of DoRA problems (NumPy arrays), for the NumPy and
                       the PyTorch tests; each output row positive, negative, erased or dead
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
    in_features = draw(st.integers(1, max_dim), label="in")
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
    return Problem(x=array(*batch, in_features), W0=W0, A=A, B=B, m=m, bias=bias,
                   grad_y=array(*batch, out_features), scaling=scaling, rows=kinds)
