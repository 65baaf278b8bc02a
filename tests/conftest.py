"""pytest configuration: hypothesis profiles, and the switch that points the tests at the exercises.

    pytest                                  # the reference, fast hypothesis profile
    HYPOTHESIS_PROFILE=thorough pytest      # many more examples per property
    pytest tests/test_reference.py --impl=exercises   # your solutions in tutorial/exercises/
"""

import importlib
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent

# deadline=None: torch's first call in a process is slow, and timing is not what we test.
settings.register_profile("fast", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

IMPLEMENTATIONS = {
    "reference": "dora_minimal.reference",
    "exercises": "tutorial.exercises.dora",
}


def pytest_addoption(parser):
    parser.addoption("--impl", choices=sorted(IMPLEMENTATIONS), default="reference",
                     help="which module the NumPy property tests check: the reference (default) "
                          "or your solutions in tutorial/exercises/dora.py")


@pytest.fixture(scope="session")
def dora(request):
    """The module under test by tests/test_reference.py (see --impl)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(IMPLEMENTATIONS[request.config.getoption("--impl")])


@pytest.fixture(scope="module", params=["small-step", "factored"])
def dora_path(request):
    """Runs a test with each of DoRAFunction's two paths: forming W' for small steps (as chosen
    at these sizes) and the factored path that larger steps take."""
    from dora_minimal import functional
    saved = functional.SMALL_STEP
    functional.SMALL_STEP = saved if request.param == "small-step" else -1
    yield request.param
    functional.SMALL_STEP = saved
