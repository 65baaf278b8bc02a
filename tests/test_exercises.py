"""The exercises ship unsolved and mirror the reference: same names, same signatures, and every
stub raises NotImplementedError. (.ci/run also checks that every property test fails against
them: `pytest tests/test_reference.py --impl=exercises`.)"""

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

from dora_minimal import reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tutorial.exercises import dora as exercises  # noqa: E402

PUBLIC = sorted(name for name, f in vars(reference).items()
                if inspect.isfunction(f) and f.__module__ == reference.__name__
                and not name.startswith("_"))


def test_the_exercises_cover_every_public_function_of_the_reference():
    assert PUBLIC == sorted(n for n, f in vars(exercises).items() if inspect.isfunction(f))
    assert len(PUBLIC) == 10


@pytest.mark.parametrize("name", PUBLIC)
def test_each_stub_has_the_reference_signature_and_is_unsolved(name):
    stub = getattr(exercises, name)
    assert inspect.signature(stub) == inspect.signature(getattr(reference, name))
    W0, A, B, m = np.ones((3, 2)), np.ones((1, 2)), np.ones((3, 1)), np.ones(3)
    arguments = {"W": W0, "V": W0, "W0": W0, "W_merged": W0, "A": A, "B": B, "m": m,
                 "scaling": 1.0, "norm": m, "x": np.ones((4, 2)), "grad_y": np.ones((4, 3)),
                 "grad_W": W0}
    parameters = inspect.signature(stub).parameters
    with pytest.raises(NotImplementedError):
        stub(**{p: arguments[p] for p in parameters if p in arguments})
