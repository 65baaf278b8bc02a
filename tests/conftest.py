"""pytest configuration: hypothesis profiles, and the options that point the tests at the exercises.

    pytest                                  # the reference, fast hypothesis profile
    HYPOTHESIS_PROFILE=thorough pytest      # many more examples per property
    pytest tests/test_reference.py --impl=exercises                # your tutorial/exercises/dora.py
    pytest tests/test_reference.py --impl=exercises --exercise 3   # only what exercises 1-3 need
    pytest tests/test_reference.py --impl=exercises --exercise 1b  # exercise 1 and its optional 1b
    pytest tests/test_reference.py --impl=path/to/my_dora.py       # a file of your own
    pytest tests/test_reference.py tests/test_exercises.py --shipped-exercises   # CI (.ci/run)
    pytest tests/test_torch_exercises.py --impl=exercises --exercise 12   # exercises 11 and 12
    pytest tests/test_reference.py --impl=exercises --every-failure  # not only the first failure

Every test of tests/test_reference.py is marked `@exercise(n, eq)`: it runs once exercises 1..n
are solved, and it checks the paper's equation `eq`. Both show in its id, `[ex03-Eq5]`. An
optional step such as "1b" (helpers.OPTIONAL_STEPS) runs only when --exercise names it, and with
the reference: a learner's other runs skip it, saying how to run it. The PyTorch exercises 11-13
work the same way; tests/test_torch_exercises.py points its tests at them.

A learner's run (--impl other than the reference) shows a wrong answer in a screenful: the first
failing test of an exercise stops the tests of that exercise and of the later ones (which would
fail with it; --every-failure runs them), and its report is the test's prepared message
(helpers.WrongAnswer: the quantity, its equation, entries yours vs expected), the example's sizes
and the exercise's chapter and hint, without pytest's traceback (--tb=short shows it).
"""

import argparse
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

import helpers
from helpers import (CHAPTERS, EXERCISES, OPTIONAL_STEPS, TORCH_CHAPTERS, TORCH_EXERCISES,
                     WrongAnswer, natural_row_norm)

ROOT = Path(__file__).resolve().parent.parent

# deadline=None: torch's first call in a process is slow, and timing is not what we test.
settings.register_profile("fast", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# mutation testing (.ci/mutation.py): the fast profile with a fixed seed, so that runs agree, and
# no shrinking: whether a mutant fails a test counts, not its smallest failing example
settings.register_profile("mutation", max_examples=25, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow],
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
# --shipped-exercises: a test that must fail on a stub fails at its first example, unshrunk
settings.register_profile("shipped", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

IMPLEMENTATIONS = {
    "reference": "dora_minimal.reference",
    "exercises": "tutorial.exercises.dora",
}


def implementation(value):
    """--impl's value: 'reference', 'exercises', or the path of a .py file (made absolute)."""
    if value in IMPLEMENTATIONS:
        return value
    path = Path(value)
    if path.suffix == ".py" and path.is_file():
        return str(path.resolve())
    raise argparse.ArgumentTypeError(
        f"expected 'reference', 'exercises' or the path of an existing .py file, got {value!r}")


def exercise_number(value):
    """--exercise's value: an integer from 1 to 13 (11-13: the PyTorch exercises), or the name of
    an optional step ("1b")."""
    last = len(EXERCISES) + len(TORCH_EXERCISES)
    if value.isdigit() and 1 <= int(value) <= last:
        return int(value)
    if value in OPTIONAL_STEPS:
        return value
    raise argparse.ArgumentTypeError(
        f"expected an exercise number from 1 to {last} or an optional step "
        f"({', '.join(OPTIONAL_STEPS)}), got {value!r}")


def exercise_of(step):
    """The exercise a step belongs to: 3 for 3, 1 for the optional step "1b"."""
    return step if isinstance(step, int) else int(step.rstrip("abcdefghijklmnopqrstuvwxyz"))


def pytest_addoption(parser):
    parser.addoption("--impl", type=implementation, default="reference",
                     help="which module tests/test_reference.py checks: 'reference' (the default), "
                          "'exercises' (tutorial/exercises/dora.py) or the path of your own .py "
                          "file with the same ten functions; for tests/test_torch_exercises.py: "
                          "dora_minimal.core, tutorial/exercises/dora_torch.py or a copy of it")
    parser.addoption("--exercise", type=exercise_number, default=None, metavar="N",
                     help="run only the tests of tests/test_reference.py (and "
                          "tests/test_torch_exercises.py) that exercises 1..N make runnable; an "
                          "optional step (1b) runs those of its exercise and its own")
    parser.addoption("--every-failure", action="store_true",
                     help="with --impl: run every test, not only up to the first failing test "
                          "of an exercise (by default the tests of that exercise and of the "
                          "later ones are skipped after it)")
    parser.addoption("--shipped-exercises", action="store_true",
                     help="CI: check tutorial/exercises/dora.py and dora_torch.py as shipped "
                          "(unsolved stubs), and that each test needs exactly the exercises it "
                          "is marked with")


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(n, eq): a test of tests/test_reference.py that "
                                       "exercises 1..n make runnable, checking the paper's Eq. eq")
    if config.getoption("--impl") != "reference":
        # one screen per failure for a learner: the test's own message (see
        # pytest_runtest_makereport) unless --tb asks for pytest's traceback, one falsifying
        # example, and none of hypothesis's explanations of it
        config.learner_messages = config.option.tbstyle == "auto"
        if config.option.tbstyle == "auto":
            config.option.tbstyle = "short"
        settings.register_profile("learner", parent=settings(), report_multiple_bugs=False,
                                  phases=[phase for phase in Phase if phase != Phase.explain])
        settings.load_profile("learner")
    config.addinivalue_line("markers", "shipped_exercises: checks tutorial/exercises/dora.py (or "
                                       "dora_torch.py) as shipped; runs only with "
                                       "--shipped-exercises")
    if config.getoption("--shipped-exercises"):
        settings.load_profile("shipped")


def exercise_label(marker):
    """The id of a test marked @exercise(n, eq): 'ex03-Eq5' (two digits, so -k ex01 is not ex10),
    'ex01b-Eq2' for the optional step 1b."""
    n, eq = marker.args
    step = f"{exercise_of(n):02d}" + ("" if isinstance(n, int) else n.lstrip("0123456789"))
    return f"ex{step}" + ("" if eq is None else f"-Eq{eq}")


def pytest_generate_tests(metafunc):
    """Point each test that takes `dora` at the module under test, its id naming its exercise.

    With --shipped-exercises, a test marked @exercise(n, ...) runs twice: against the stubs with
    exercises 1..n solved (it must pass), and with 1..n-1 (it must fail). Solved means taken from
    the reference, except row_norm, which is the natural one of helpers.natural_row_norm: no test
    but those of the optional step 1b may need a range-safe norm. A test of step 1b runs with the
    reference's row_norm (it must pass) and with the natural one (it must fail).
    """
    if "dora" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("exercise")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: mark it @exercise(n, eq)")
    label = exercise_label(marker)
    if not metafunc.config.getoption("--shipped-exercises"):
        metafunc.parametrize("dora", [metafunc.config.getoption("--impl")], ids=[label],
                             indirect=True, scope="session")
        return
    n = marker.args[0]
    if n in OPTIONAL_STEPS:
        variants = [
            pytest.param((exercise_of(n), "reference"), id=f"{label}-solved"),
            pytest.param((exercise_of(n), "natural"), id=f"{label}-natural", marks=[
                pytest.mark.xfail(raises=AssertionError, strict=True,
                                  reason=f"step {n} not done: the test must fail"),
                pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")])]
    else:
        variants = [
            pytest.param((n, "natural"), id=f"{label}-solved"),
            pytest.param((n - 1, "natural"), id=f"{label}-stub", marks=pytest.mark.xfail(
                raises=NotImplementedError, strict=True,
                reason=f"exercise {n} is a stub: the test must fail on it"))]
    metafunc.parametrize("dora", variants, indirect=True, scope="session")


def load_module(impl):
    """The module named by --impl: a name of IMPLEMENTATIONS, or a .py file's path."""
    if impl in IMPLEMENTATIONS:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        return importlib.import_module(IMPLEMENTATIONS[impl])
    spec = importlib.util.spec_from_file_location(Path(impl).stem, impl)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solved_up_to(n, row_norm="reference"):
    """The shipped exercises with exercises 1..n replaced by the reference's functions, except
    row_norm (if n >= 1), which is the reference's or the natural one (helpers.natural_row_norm).
    """
    module = types.ModuleType(f"exercises_solved_up_to_{n}_{row_norm}_row_norm")
    module.__dict__.update(vars(load_module("exercises")))
    reference = load_module("reference")
    for name in EXERCISES[:n]:
        setattr(module, name, getattr(reference, name))
    if n >= 1 and row_norm == "natural":
        module.row_norm = natural_row_norm
    return module


@pytest.fixture(scope="session")
def dora(request):
    """The module under test by tests/test_reference.py (see --impl and --shipped-exercises)."""
    if isinstance(request.param, tuple):
        return solved_up_to(*request.param)
    try:
        return load_module(request.param)
    except Exception as error:  # once, not once per test
        pytest.exit(f"--impl={request.param}: importing it failed: "
                    f"{type(error).__name__}: {error}", returncode=1)


def pytest_collection_modifyitems(config, items):
    """Skip the checks of the shipped stubs unless --shipped-exercises (a learner solves them in
    place), and with --exercise N keep only the tests of exercises 1..N. An optional step's
    tests run with --exercise naming it (with those of its exercise), with the reference and
    with --shipped-exercises; a learner's other runs skip them, saying how to run them."""
    if not config.getoption("--shipped-exercises"):
        skip = pytest.mark.skip(reason="not a test of your solutions: it checks the exercise "
                                       "files as they ship, unsolved (the project's CI runs it, "
                                       "with --shipped-exercises)")
        for item in items:
            if item.get_closest_marker("shipped_exercises"):
                item.add_marker(skip)
    last = config.getoption("--exercise")
    learner = config.getoption("--impl") != "reference" and not config.getoption(
        "--shipped-exercises")
    if last is None:
        for item in items:
            marker = item.get_closest_marker("exercise")
            if learner and marker is not None and marker.args[0] in OPTIONAL_STEPS:
                step = marker.args[0]
                item.add_marker(pytest.mark.skip(
                    reason=f"optional step {step} ({OPTIONAL_STEPS[step][0]}): run it with "
                           f"--exercise {step}"))
        return

    def selected_by(step):
        if step in OPTIONAL_STEPS:
            return step == last
        return step <= exercise_of(last)

    selected, deselected = [], []
    for item in items:
        marker = item.get_closest_marker("exercise")
        (selected if marker is not None and selected_by(marker.args[0])
         else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def learner_run(config):
    """A run of a learner's solutions: --impl other than the reference, not CI's check of the
    shipped stubs."""
    return (config.getoption("--impl") != "reference"
            and not config.getoption("--shipped-exercises"))


def step_of(item):
    """The exercise (an int) or optional step ("1b") of a test marked @exercise, else None."""
    marker = item.get_closest_marker("exercise")
    return None if marker is None else marker.args[0]


def stopped_by(step, failed):
    """The failed exercise or step that stops a test of `step`: the same step, or an exercise up
    to its own (a later exercise calls the earlier ones; an optional step stops only itself)."""
    for done in failed:
        if done == step or (isinstance(done, int) and done <= exercise_of(step)):
            return done
    return None


def pytest_runtest_setup(item):
    """A learner's run stops at the first failing test of an exercise: the tests of that exercise
    and of the later ones are skipped (unless --every-failure). Clears the example's sizes."""
    helpers.note_example(None)
    step = step_of(item)
    if step is None or not learner_run(item.config) or item.config.getoption("--every-failure"):
        return
    done = stopped_by(step, getattr(item.config, "failed_steps", []))
    if done is not None:
        item.config.stopped = getattr(item.config, "stopped", 0) + 1
        pytest.skip(f"exercise {done} failed above; --every-failure runs this test too")


def location_in_solution(excinfo):
    """'path:line: source' of the innermost frame of the traceback outside the tests and the
    libraries (the learner's code), or None."""
    tests = Path(__file__).resolve().parent
    for entry in reversed(excinfo.traceback):
        path = Path(str(entry.path)).resolve()
        if tests in path.parents or "site-packages" in path.parts or not path.is_file():
            continue
        try:
            shown = path.relative_to(ROOT)
        except ValueError:
            shown = path
        source = str(entry.statement).strip().splitlines()
        return f"{shown}:{entry.lineno + 1}: {source[0] if source else ''}"
    return None


def learner_message(item, call):
    """The body of a failed test's report in a learner's run: a WrongAnswer's message; an
    assertion's own message (without pytest's expansion of it); or the error the solution
    raised, and where; then the example's sizes."""
    error = call.excinfo.value
    if isinstance(error, WrongAnswer):
        lines = [str(error)]
    elif isinstance(error, AssertionError):
        message = str(error).split("\nassert ")[0].strip()
        if message.startswith("assert "):  # a bare assert: say what the test checks
            doc = (item.function.__doc__ or item.function.__name__).strip()
            message = "this does not hold: " + doc.splitlines()[0]
        lines = [message]
    else:
        lines = [f"your code raised {type(error).__name__}: "
                 + str(error).strip().splitlines()[0] if str(error).strip() else
                 f"your code raised {type(error).__name__}"]
        where = location_in_solution(call.excinfo)
        if where:
            lines.append(f"  at {where}")
    if helpers.EXAMPLE["sizes"]:
        lines.append(f"example: {helpers.EXAMPLE['sizes']}")
    lines.append("(--tb=short shows the test's code and the whole example)")
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed exercise test says which exercise and equation it checks (the equation of the
    quantity found wrong, where the test names it), and where to read; one that failed on a
    stub's NotImplementedError says only that, in one line. In a learner's run, its report is
    learner_message's, and the exercise is noted as failed (pytest_runtest_setup)."""
    report = yield
    marker = item.get_closest_marker("exercise")
    if not report.failed or marker is None or hasattr(report, "wasxfail"):
        return report
    n, eq = marker.args
    learner = learner_run(item.config)
    if learner and n not in getattr(item.config, "failed_steps", []):
        item.config.failed_steps = getattr(item.config, "failed_steps", []) + [n]
    if call.excinfo is not None and call.excinfo.errisinstance(NotImplementedError):
        report.longrepr = f"not solved yet: NotImplementedError: {call.excinfo.value}"
    elif item.config.getoption("--impl") != "reference":
        if call.excinfo is not None and getattr(call.excinfo.value, "equation", None):
            eq = call.excinfo.value.equation
        if learner and getattr(item.config, "learner_messages", False) and call.excinfo:
            report.longrepr = learner_message(item, call)
        equation = "" if eq is None else f", the paper's Eq. {eq}"
        names, chapters = EXERCISES + TORCH_EXERCISES, CHAPTERS + TORCH_CHAPTERS
        name, chapter = (OPTIONAL_STEPS[n] if n in OPTIONAL_STEPS
                         else (names[n - 1], chapters[n - 1]))
        what = "optional step" if n in OPTIONAL_STEPS else "exercise"
        report.sections.append((
            f"{what} {n} ({name}){equation}",
            f"read tutorial/{chapter}.md; stuck? hint {n} in tutorial/exercises/HINTS.md"))
    return report


def pytest_terminal_summary(terminalreporter, config):
    """A learner's run ends saying why tests were skipped, in words."""
    if not learner_run(config):
        return
    stopped = getattr(config, "stopped", 0)
    if stopped:
        first = ", ".join(map(str, getattr(config, "failed_steps", [])))
        terminalreporter.write_line(
            f"Stopped at the first failing test of exercise {first}: {stopped} later "
            f"test{'s' * (stopped > 1)} (of that exercise and the next ones) "
            f"{'were' if stopped > 1 else 'was'} skipped; --every-failure runs them.")
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        reason = reason.removeprefix("Skipped: ")
        if "failed above" not in reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"{count} skipped: {reason}")


@pytest.fixture(scope="module", params=["core", "merged_weight", "blocked"])
def dora_path(request):
    """Runs a test once per route of dora_minimal.routes, forced by name (a call that a route
    cannot serve, such as merged_weight under dropout or in bf16, takes the core)."""
    from dora_minimal.routes import force_route
    with force_route(request.param):
        yield request.param
