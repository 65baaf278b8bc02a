"""The exercises: ten stubs of dora_minimal.reference, in the order the tutorial teaches them.

The list of exercises (helpers.EXERCISES) is checked against the reference in every run. The
stubs themselves are checked only with --shipped-exercises (.ci/run passes it), since a learner
solves them in place: they mirror the reference (names, signatures), each raises
NotImplementedError naming its exercise, and pointed at them every test fails, in a few lines.
With the same option, tests/test_reference.py checks that each of its tests needs exactly the
exercises it is marked with (see conftest.py).
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


@shipped
def test_the_stub_run_fails_every_test_in_one_short_screen_each():
    """What a learner sees first: every test fails, one line each, no hypothesis noise."""
    # as on a learner's machine: with CI set, pytest would not shorten its summary lines
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_reference.py",
                          "--impl=exercises", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    counts = re.search(r"=+ (\d+) failed in", run.stdout)
    assert run.returncode == 1 and counts, run.stdout[-2000:]
    failed = int(counts.group(1))
    collected = int(re.search(r"collected (\d+) items", run.stdout).group(1))
    assert failed == collected
    assert run.stdout.count("not solved yet: NotImplementedError: exercise ") == failed
    assert len(run.stdout.splitlines()) <= 3 * failed + 20
