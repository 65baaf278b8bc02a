"""The exercises: ten stubs of dora_minimal.reference, in the order the tutorial teaches them.

The list of exercises (helpers.EXERCISES) is checked against the reference in every run. The
stubs themselves are checked only with --shipped-exercises (.ci/run passes it), since a learner
solves them in place: they mirror the reference (names, signatures), each raises
NotImplementedError naming its exercise, and pointed at them the run stops at exercise 1 in a
few lines (with --every-failure, every test fails in a line each).
With the same option, tests/test_reference.py checks that each of its tests needs exactly the
exercises it is marked with (see conftest.py), and the tests here check that the graded tests
teach: solutions with mistakes learners make fail them, a wrong answer fails in a screenful
that names the wrong quantity, and the equations written as a learner first writes them pass
them (all but the optional step 1b's).
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dora_minimal import reference
from helpers import CHAPTERS, EXERCISES

ROOT = Path(__file__).resolve().parent.parent
shipped = pytest.mark.shipped_exercises


def test_the_exercises_are_the_public_functions_of_the_reference_in_the_order_they_build_up():
    public = {name for name, f in vars(reference).items()
              if inspect.isfunction(f) and f.__module__ == reference.__name__
              and not name.startswith("_")}
    assert sorted(EXERCISES) == sorted(public) and len(EXERCISES) == len(CHAPTERS) == 10
    for chapter in CHAPTERS:
        assert (ROOT / "tutorial" / f"{chapter}.md").is_file(), chapter


def exercises_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tutorial.exercises import dora
    return dora


@shipped
def test_the_stubs_are_the_ten_exercises():
    stubs = exercises_module()
    assert sorted(n for n, f in vars(stubs).items() if inspect.isfunction(f)) == sorted(EXERCISES)


@shipped
@pytest.mark.parametrize("number", range(1, 11))
def test_each_stub_has_the_reference_signature_and_raises_naming_its_exercise(number):
    name = EXERCISES[number - 1]
    stub = getattr(exercises_module(), name)
    assert inspect.signature(stub) == inspect.signature(getattr(reference, name))
    assert stub.__doc__.startswith(f"Exercise {number}")
    W0, A, B, m = np.ones((3, 2)), np.ones((1, 2)), np.ones((3, 1)), np.ones(3)
    arguments = {"W": W0, "V": W0, "W0": W0, "W_merged": W0, "A": A, "B": B, "m": m,
                 "scaling": 1.0, "norm": m, "x": np.ones((4, 2)), "grad_y": np.ones((4, 3)),
                 "grad_W": W0}
    with pytest.raises(NotImplementedError, match=f"^exercise {number}: {name}$"):
        stub(**{p: arguments[p] for p in inspect.signature(stub).parameters if p in arguments})


def stub_run(*options):
    """tests/test_reference.py run on the shipped stubs, as on a learner's machine (with CI set,
    pytest would not shorten its summary lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_reference.py",
                           "--impl=exercises", "-p", "no:cacheprovider", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@shipped
def test_the_stub_run_stops_at_exercise_1_in_one_short_screen():
    """What a learner sees first: exercise 1's first test fails in a line, the rest are skipped,
    and the run says why and how to see every failure."""
    run = stub_run()
    counts = re.search(r"=+ 1 failed, (\d+) skipped in", run.stdout)
    assert run.returncode == 1 and counts, run.stdout[-2000:]
    collected = int(re.search(r"collected (\d+) items", run.stdout).group(1))
    assert int(counts.group(1)) == collected - 1
    assert run.stdout.count("not solved yet: NotImplementedError: exercise 1: row_norm") == 1
    assert "Stopped at the first failing test of exercise 1" in run.stdout
    assert "--every-failure runs them" in run.stdout
    assert len(run.stdout.splitlines()) <= 40, run.stdout


@shipped
def test_the_stub_run_with_every_failure_fails_every_test_in_one_short_screen_each():
    """With --every-failure every test fails, one line each, no hypothesis noise; the optional
    steps' tests are skipped, each saying how to run it."""
    run = stub_run("--every-failure", "-rs")
    counts = re.search(r"=+ (\d+) failed, (\d+) skipped in", run.stdout)
    assert run.returncode == 1 and counts, run.stdout[-2000:]
    failed, skipped = int(counts.group(1)), int(counts.group(2))
    collected = int(re.search(r"collected (\d+) items", run.stdout).group(1))
    assert failed + skipped == collected and 0 < skipped < failed
    # the skipped tests are those of the optional steps, which run when asked for by name
    optional = re.findall(r"^SKIPPED \[(\d+)\] .*: optional step \w+ \(\w+\): run it with "
                          r"--exercise \w+$", run.stdout, re.MULTILINE)
    assert sum(map(int, optional)) == skipped, run.stdout[-2000:]
    assert run.stdout.count("not solved yet: NotImplementedError: exercise ") == failed
    assert len(run.stdout.splitlines()) <= 3 * failed + 20


# Mistakes that learners make, each a complete solution (the reference) with one function
# wrong: {name: (exercise, source)}. The tests of that exercise must catch each.
HEADER = "import numpy as np\nfrom dora_minimal.reference import *  # noqa: F401,F403\n" \
         "from dora_minimal.reference import _divide_or_zero\n\n"
MISTAKES = {
    "decompose returns float64": (2, """
def decompose(W):
    m = row_norm(W)
    direction = np.zeros(W.shape)
    np.divide(W, m[:, None], out=direction, where=m[:, None] != 0)
    return m, direction
"""),
    "|m| in recombine": (4, """
def recombine(m, V):
    return _divide_or_zero(np.abs(m)[:, None] * V, row_norm(V)[:, None])
"""),
    "|m| in forward's scale": (5, """
def forward(x, W0, A, B, m, scaling, bias=None):
    c = _divide_or_zero(np.abs(m), row_norm(adapt(W0, A, B, scaling)))
    y = c * (x @ W0.T + scaling * ((x @ A.T) @ B.T))
    return y if bias is None else y + bias
"""),
    "norm / m in unmerge": (7, """
def unmerge(W_merged, A, B, m, scaling, norm):
    if np.any((m == 0) & (norm > 0)):
        raise ValueError("m: erased rows")
    return W_merged * (norm / m)[:, None] - scaling * (B @ A)
"""),
    "|m| in unmerge": (7, """
def unmerge(W_merged, A, B, m, scaling, norm):
    if np.any((m == 0) & (norm > 0)):
        raise ValueError("m: erased rows")
    return W_merged * _divide_or_zero(norm, np.abs(m))[:, None] - scaling * (B @ A)
"""),
    "unmerge checks m == 1 for erased rows": (7, """
def unmerge(W_merged, A, B, m, scaling, norm):
    if np.any((m == 1) & (norm > 0)):
        raise ValueError("m: erased rows")
    return W_merged * _divide_or_zero(norm, m)[:, None] - scaling * (B @ A)
"""),
    "unmerge refuses every row with m = 0": (7, """
def unmerge(W_merged, A, B, m, scaling, norm):
    if np.any(m == 0):
        raise ValueError("m: erased rows")
    return W_merged * _divide_or_zero(norm, m)[:, None] - scaling * (B @ A)
"""),
    "magnitude_grad returns float64": (8, """
def magnitude_grad(V, grad_W):
    return _divide_or_zero(np.sum(grad_W * V, axis=1), row_norm(V.astype(np.float64)))
"""),
    "|m| in dL/dV'": (9, """
def adapted_weight_grad(V, m, grad_W, detach_norm=True):
    scale = _divide_or_zero(np.abs(m)[:, None], row_norm(V)[:, None])
    if detach_norm:
        return scale * grad_W
    unit = _divide_or_zero(V, row_norm(V)[:, None])
    return scale * (grad_W - np.sum(grad_W * unit, axis=1, keepdims=True) * unit)
"""),
    "the exact gradient by default": (9, """
_reference_adapted_weight_grad = adapted_weight_grad


def adapted_weight_grad(V, m, grad_W, detach_norm=False):
    return _reference_adapted_weight_grad(V, m, grad_W, detach_norm)
"""),
    "dL/dm from W' instead of V'": (10, """
_reference_backward = backward


def backward(x, W0, A, B, m, scaling, grad_y, detach_norm=True):
    grads = _reference_backward(x, W0, A, B, m, scaling, grad_y, detach_norm)
    W = merge(W0, A, B, m, scaling)
    G, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
    grads["m"] = magnitude_grad(W, G.T @ x2)
    return grads
"""),
    "the exact gradient by default in backward": (10, """
_reference_backward = backward


def backward(x, W0, A, B, m, scaling, grad_y, detach_norm=False):
    return _reference_backward(x, W0, A, B, m, scaling, grad_y, detach_norm)
"""),
}


@shipped
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_tests_of_an_exercise_catch_a_mistake_learners_make(mistake, tmp_path):
    """A solution with this mistake fails the tests of its exercise, and the failure names the
    exercise, its chapter and its hint."""
    number, source = MISTAKES[mistake]
    solution = tmp_path / "solution_with_a_mistake.py"
    solution.write_text(HEADER + source.lstrip())
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_reference.py",
                          f"--impl={solution}", "-k", f"ex{number:02d}", "-p", "no:randomly",
                          "-p", "no:cacheprovider", "-q", "-rf"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:]
    failed = re.findall(r"^FAILED tests/test_reference.py::(\w+)\[", run.stdout, re.MULTILINE)
    assert failed, run.stdout[-2000:]
    chapter = CHAPTERS[number - 1]
    assert f"exercise {number} ({EXERCISES[number - 1]})" in run.stdout
    assert f"read tutorial/{chapter}.md; stuck? hint {number} in" in run.stdout


# The ten exercises as a learner first writes them, following the hints: the equations with the
# zero-row rule, and no care for overflow or underflow.
NATURAL_SOLUTION = '''import numpy as np


def row_norm(W):
    return np.sqrt(np.sum(W**2, axis=1))


def unit_rows(V):
    n = row_norm(V)[:, None]
    return np.divide(V, n, out=np.zeros_like(V), where=n != 0)


def decompose(W):
    return row_norm(W), unit_rows(W)


def adapt(W0, A, B, scaling):
    return W0 + scaling * (B @ A)


def recombine(m, V):
    return m[:, None] * unit_rows(V)


def scale(m, V):
    n = row_norm(V)
    return np.divide(m, n, out=np.zeros_like(m), where=n != 0)


def forward(x, W0, A, B, m, scaling, bias=None):
    c = scale(m, adapt(W0, A, B, scaling))
    y = c * (x @ W0.T + scaling * ((x @ A.T) @ B.T))
    return y if bias is None else y + bias


def merge(W0, A, B, m, scaling):
    return recombine(m, adapt(W0, A, B, scaling))


def unmerge(W_merged, A, B, m, scaling, norm):
    if np.any((m == 0) & (norm > 0)):
        raise ValueError("m: a row with m = 0 was erased by merge")
    ratio = np.divide(norm, m, out=np.zeros_like(norm), where=m != 0)
    return W_merged * ratio[:, None] - scaling * (B @ A)


def magnitude_grad(V, grad_W):
    return scale(np.sum(grad_W * V, axis=1), V)


def adapted_weight_grad(V, m, grad_W, detach_norm=True):
    c = scale(m, V)[:, None]
    if detach_norm:
        return c * grad_W
    u = unit_rows(V)
    return c * (grad_W - np.sum(grad_W * u, axis=1, keepdims=True) * u)


def backward(x, W0, A, B, m, scaling, grad_y, detach_norm=True):
    x2 = x.reshape(-1, x.shape[-1])
    G = grad_y.reshape(-1, grad_y.shape[-1])
    V = adapt(W0, A, B, scaling)
    grad_W = G.T @ x2
    grad_V = adapted_weight_grad(V, m, grad_W, detach_norm)
    return {"x": (G @ recombine(m, V)).reshape(x.shape), "A": scaling * B.T @ grad_V,
            "B": scaling * grad_V @ A.T, "m": magnitude_grad(V, grad_W)}
'''


@shipped
def test_a_natural_solution_passes_every_exercise_and_fails_only_the_optional_step_1b(tmp_path):
    """Exercise 1 asks for the row norm, not for range safety: the equations as a learner first
    writes them pass every exercise's tests, and fail only those of step 1b."""
    solution = tmp_path / "natural_solution.py"
    solution.write_text(NATURAL_SOLUTION)

    def run(*options):
        return subprocess.run([sys.executable, "-m", "pytest", "tests/test_reference.py",
                               f"--impl={solution}", "-p", "no:randomly", "-p",
                               "no:cacheprovider", "-q", "-rfs", *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    every_exercise = run()
    assert every_exercise.returncode == 0, every_exercise.stdout[-2000:]
    assert re.search(r"\d+ passed, \d+ skipped in", every_exercise.stdout)
    step_1b = run("--exercise", "1b")
    assert step_1b.returncode == 1, step_1b.stdout[-2000:]
    failed = re.findall(r"^FAILED tests/test_reference.py::\w+\[(\w+)", step_1b.stdout,
                        re.MULTILINE)
    assert failed and set(failed) == {"ex01b"}, step_1b.stdout[-2000:]
    assert "optional step 1b (row_norm), the paper's Eq. 2" in step_1b.stdout
    assert "stuck? hint 1b in tutorial/exercises/HINTS.md" in step_1b.stdout


# Wrong answers as a learner runs them (the documented command, --exercise N): {name: (exercise,
# source, what the screen must say)}. Each fits a screen, names the wrong quantity, and shows
# none of pytest's object reprs nor the test's code (which would give the answer away).
WRONG_ANSWERS = {
    "the norm over the wrong axis": (1, """
def row_norm(W):
    return np.sqrt(np.sum(W**2, axis=0))
""", ["row_norm(W) has the wrong shape: expected (1,), got (2,)", "Eq. 2: ‖W‖_c"]),
    "s forgotten in adapt": (3, """
def adapt(W0, A, B, scaling):
    return W0 + B @ A
""", ["V', adapt's result is wrong", "Eq. 5: V' = W0 + s·B A", "yours/expected"]),
    "∂L/∂A's sign flipped": (10, """
_reference_backward = backward


def backward(x, W0, A, B, m, scaling, grad_y, detach_norm=True):
    grads = _reference_backward(x, W0, A, B, m, scaling, grad_y, detach_norm)
    return grads | {"A": -grads["A"]}
""", ["∂L/∂A, backward's 'A' is wrong", "              -1\n"]),
}


@shipped
@pytest.mark.parametrize("mistake", WRONG_ANSWERS)
def test_a_wrong_answer_fails_in_a_screenful(mistake, tmp_path):
    number, source, said = WRONG_ANSWERS[mistake]
    solution = tmp_path / "solution_with_a_mistake.py"
    solution.write_text(HEADER + source.lstrip())
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_reference.py",
                          f"--impl={solution}", "--exercise", str(number), "-p",
                          "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1 and " 1 failed" in run.stdout, run.stdout[-3000:]
    assert len(run.stdout.splitlines()) <= 40, run.stdout
    for text in said + [f"exercise {number} ({EXERCISES[number - 1]})", "example: out="]:
        assert text in run.stdout, (text, run.stdout)
    for text in ["+ where", "Problem(", "p.W0", "assert ", "Falsifying", "Failing test case"]:
        assert text not in run.stdout, (text, run.stdout)
