"""Exercises: DoRA's four steps and their gradients, in NumPy. Fill in each function.

Each function has the same name and signature as in dora_minimal.reference, and the same property
tests check it. Solve the exercises in order (1 to 10); after exercise N, run the tests that
exercises 1 to N make runnable with

    python -m pytest tests/test_reference.py --impl=exercises --exercise N

(without --exercise: all of them; with -k ex02 instead: those of exercise 2 alone). Shapes follow
torch.nn.Linear: W0 (out, in), A (r, in), B (out, r), m (out,), x (..., in). Use NumPy only.
Keep the input's dtype: float32 in, float32 out.

The magnitude m is trained, so it can be negative or 0: W' = m · V'/‖V'‖_c then points against
V', or is a zero row. A zero row of V' (a dead unit) has no direction: count x / 0 as 0 there.

Optional step 1b, after exercise 1: make row_norm safe from overflow and underflow
(--exercise 1b runs its tests; the other runs skip them).

Stuck? tutorial/exercises/HINTS.md has one hint per exercise, kept apart so you can choose not to
read it. The chapters of tutorial/ explain each equation.
"""

import numpy as np  # noqa: F401  (you will need it)


def row_norm(W):
    """Exercise 1 (Eq. 2's ‖·‖_c). The L2 norm of each output row of W (out, in) -> (out,).

    Optional step 1b: rows whose squares would under- or overflow (1e-30 in float32, 1e-200 and
    1e200 in float64, or both in one row) still get their norm.
    """
    raise NotImplementedError("exercise 1: row_norm")


def decompose(W):
    """Exercise 2 (Eq. 2). Return (m, direction): m = ‖W‖_c (out,) and direction = W / ‖W‖_c
    (out, in) with unit rows. A row of zeros gets a zero direction, not NaN.
    """
    raise NotImplementedError("exercise 2: decompose")


def adapt(W0, A, B, scaling):
    """Exercise 3 (Eq. 5). Return V' = W0 + scaling · B A (out, in)."""
    raise NotImplementedError("exercise 3: adapt")


def recombine(m, V):
    """Exercise 4 (Eq. 5). Return W' = m · V / ‖V‖_c (out, in): row j of V rescaled to length
    |m_j|. A zero row of V gives a zero row of W'.
    """
    raise NotImplementedError("exercise 4: recombine")


def forward(x, W0, A, B, m, scaling, bias=None):
    """Exercise 5 (Eq. 5). The layer's output y (..., out) for x (..., in):
    y = (m / ‖V'‖_c) ⊙ (x W0^T + s · (x A^T) B^T) + bias. A zero row of V' outputs its bias.
    """
    raise NotImplementedError("exercise 5: forward")


def merge(W0, A, B, m, scaling):
    """Exercise 6 (Eq. 5). Return the merged weight W' = m · V' / ‖V'‖_c, V' = W0 + s·B A."""
    raise NotImplementedError("exercise 6: merge")


def unmerge(W_merged, A, B, m, scaling, norm):
    """Exercise 7 (Eq. 5, solved for W0). Undo merge: return W0, given W' and norm = the stored
    ‖V'‖_c (out,).
    Raise ValueError for a row with m = 0 and norm > 0 (its W0 cannot be recovered). A dead unit,
    m = 0 and norm = 0, is not erased: its row of W' is 0 and so is its V'.
    """
    raise NotImplementedError("exercise 7: unmerge")


def magnitude_grad(V, grad_W):
    """Exercise 8 (Eq. 7). ∂L/∂m (out,) from V' (out, in) and ∂L/∂W' (out, in)."""
    raise NotImplementedError("exercise 8: magnitude_grad")


def adapted_weight_grad(V, m, grad_W, detach_norm=True):
    """Exercise 9 (Eq. 6 and 11). ∂L/∂V' (out, in) from ∂L/∂W' (out, in): Eq. 11 if detach_norm
    (the norm is a constant), else Eq. 6 (the exact gradient, projected orthogonal to each row of
    V').
    """
    raise NotImplementedError("exercise 9: adapted_weight_grad")


def backward(x, W0, A, B, m, scaling, grad_y, detach_norm=True):
    """Exercise 10 (Eq. 6, 7, 11). Gradients of L, given ∂L/∂y = grad_y (..., out) for
    y = forward(...) (the norm detached or not, as in exercise 9).
    Return {"x": (..., in), "A": (r, in), "B": (out, r), "m": (out,)}.
    """
    raise NotImplementedError("exercise 10: backward")
