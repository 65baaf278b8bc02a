"""Every Python code block of README.md and tutorial/*.md runs, and every output it shows is
what the code prints. The blocks also work as a reader runs them (`python -m doctest FILE.md`, or
pasted into `python`), and the docs name only tests that exist, under the exercises that make
them runnable.

A ```python block with `>>>` prompts runs as a doctest (its shown output is checked); one
without prompts is executed. The blocks of one file share their names, in order, as a reader
running them one after another would. Blocks run in a temporary directory.
"""

import doctest
import importlib.util
import inspect
import re
import shlex
import subprocess
from code import InteractiveConsole
from datetime import date
from pathlib import Path

import pytest

import test_reference
import test_torch_exercises
from helpers import CHAPTERS, EXERCISES, OPTIONAL_STEPS, TORCH_CHAPTERS, TORCH_EXERCISES

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "tutorial").glob("[0-9]*.md"))
# documents whose >>> blocks still need the blank lines of the two tests below
NOT_YET_PASTEABLE = set()
NOT_YET_DOCTESTABLE = set()
EXERCISE_DOCS = [ROOT / "tutorial" / "README.md", ROOT / "tutorial" / "exercises" / "README.md",
                 ROOT / "tutorial" / "exercises" / "HINTS.md",
                 ROOT / "tutorial" / "exercises" / "dora.py",
                 ROOT / "tutorial" / "exercises" / "dora_torch.py"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# packages that are no dependency: a block importing one that is not installed is not run, nor are
# the blocks after it (they may use its names)
OPTIONAL = ("transformers", "peft", "accelerate", "safetensors")


def missing_packages(code):
    """The optional packages `code` imports that are not installed."""
    imported = re.findall(r"^(?:>>> )?(?:from|import) (\w+)", code, re.MULTILINE)
    return [name for name in imported
            if name in OPTIONAL and importlib.util.find_spec(name) is None]


def python_blocks(path):
    """[(line number, code)] for each ```python block of a Markdown file."""
    text = path.read_text()
    return [(text[:match.start()].count("\n") + 1, match.group(1))
            for match in BLOCK.finditer(text)]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_runs_and_shows_what_it_prints(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(path)
    assert blocks, f"{path.name} has no python block"
    namespace = {"__name__": "__doc_test__"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for line, code in blocks:
        if missing_packages(code):
            break
        if ">>>" in code:
            test = parser.get_doctest(code, namespace, f"{path.name}:{line}", str(path), line)
            result = runner.run(test, clear_globs=False)
            namespace.update(test.globs)  # a DocTest runs on a copy of the names it is given
            assert result.failed == 0, f"{path.name}, block at line {line}: see the output above"
        else:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)


def test_ci_runs_the_readme_install_and_test_commands():
    """.ci/run must install and test with the README's own commands."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.*?)\n```", readme, re.MULTILINE | re.DOTALL)
    assert len(commands) >= 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands[:2]:
        assert command in ci, f"{command!r} is not a line of .ci/run"


def except_for(names):
    """DOCUMENTS as parameters, those named in `names` expected to fail (strictly)."""
    return [pytest.param(path, id=str(path.relative_to(ROOT)), marks=[pytest.mark.xfail(
        strict=True, reason="blank lines still to add")] if path.name in names else [])
        for path in DOCUMENTS]


@pytest.mark.parametrize("path", except_for(NOT_YET_DOCTESTABLE))
def test_python_m_doctest_reads_no_closing_fence_as_output(path):
    """`python -m doctest FILE.md` takes an example's output to run until a blank line: a fence
    right after the output would be read as output."""
    examples = doctest.DocTestParser().get_examples(path.read_text())
    assert examples
    wrong = [example.lineno + 1 for example in examples if "```" in example.want]
    assert not wrong, f"{path.name}: put a blank line before the fence after line(s) {wrong}"


class SyntaxOnlyConsole(InteractiveConsole):
    """The interactive interpreter, compiling what is typed without running it."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def runcode(self, code_object):
        pass

    def showsyntaxerror(self, filename=None, **kwargs):
        self.errors.append(self.buffer[:])


@pytest.mark.parametrize("path", except_for(NOT_YET_PASTEABLE))
def test_each_prompt_block_pastes_into_the_interactive_interpreter(path):
    """Pasted into `python` without its prompts and outputs, line by line, every block compiles:
    an indented block must end with an empty `...` line, as the interpreter needs."""
    for line, block in python_blocks(path):
        console = SyntaxOnlyConsole()
        for source_line in block.splitlines():
            if source_line[:4] in (">>> ", "... ") or source_line in (">>>", "..."):
                console.push(source_line[4:])
        console.push("")
        assert not console.errors, f"{path.name}, block at line {line}: {console.errors}"


def mentioned_tests(text):
    """The test names (or prefixes ending in *) a text mentions, files like test_x.py aside."""
    return set(re.findall(r"(?<![\w.])(test_\w+\*?)(?![\w*]|\.py)", text))


def exercise_of_each_test():
    """{name: exercise} for the tests of the exercises (tests/test_reference.py and
    tests/test_torch_exercises.py)."""
    return {name: next(m.args[0] for m in f.pytestmark if m.name == "exercise")
            for module in (test_reference, test_torch_exercises)
            for name, f in vars(module).items()
            if name.startswith("test_") and inspect.isfunction(f)
            and any(m.name == "exercise" for m in getattr(f, "pytestmark", []))}


# NumPy's exercises 1-10, then PyTorch's 11-13
ALL_EXERCISES, ALL_CHAPTERS = EXERCISES + TORCH_EXERCISES, CHAPTERS + TORCH_CHAPTERS


def matching(pattern, names):
    return [n for n in names if n == pattern or (pattern.endswith("*")
                                                 and n.startswith(pattern[:-1]))]


@pytest.mark.parametrize("path", DOCUMENTS + EXERCISE_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_name_tests_that_exist_under_the_exercises_that_make_them_runnable(path):
    """A chapter names, among the tests of exercises, only those of its own exercises."""
    every_test = {name for test_file in (ROOT / "tests").glob("test_*.py")
                  for name in re.findall(r"^def (test_\w+)", test_file.read_text(), re.MULTILINE)}
    exercise = exercise_of_each_test()
    taught_here = {n for n, chapter in enumerate(ALL_CHAPTERS, 1) if chapter == path.stem}
    taught_here |= {step for step, (_, chapter) in OPTIONAL_STEPS.items() if chapter == path.stem}
    for pattern in mentioned_tests(path.read_text()):
        assert matching(pattern, every_test), f"{path.name} names {pattern}, which is no test"
        if taught_here:
            needs = {exercise[name] for name in matching(pattern, exercise)}
            assert needs <= taught_here, f"{path.name} lists {pattern}, of exercises {needs}"


def test_the_exercise_tables_and_hints_follow_the_exercises():
    readme = (ROOT / "tutorial" / "exercises" / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| \[\d+\]\(\.\./(\w+)\.md\)", readme,
                      re.MULTILINE)
    assert rows == [(str(n), name, chapter)
                    for n, (name, chapter) in enumerate(zip(ALL_EXERCISES, ALL_CHAPTERS), 1)]
    hints = (ROOT / "tutorial" / "exercises" / "HINTS.md").read_text()
    assert re.findall(r"<summary>(\d+)\. (\w+)</summary>", hints) == [
        (str(n), name) for n, name in enumerate(ALL_EXERCISES, 1)]
    for step, (name, chapter) in OPTIONAL_STEPS.items():  # optional: a hint, and a table row
        assert f"<summary>{step}. {name} (optional)" in hints, step
        assert re.search(rf"^\| {step} \| `{name}`.*\| \[\d+\]\(\.\./{chapter}\.md\) \|",
                         readme, re.MULTILINE), step
    index = (ROOT / "tutorial" / "README.md").read_text()
    for n, chapter in enumerate(ALL_CHAPTERS, 1):
        row = re.search(rf"^\| \[[^]]*\]\({chapter}\.md\) \|.*\| ([^|]*) \|$", index,
                        re.MULTILINE)
        assert row and str(n) in re.findall(r"\d+", row.group(1)), (chapter, n)


@pytest.mark.parametrize("chapter, sources", [("06_pytorch", ["core.py"]),
                                             ("08_cost", ["routes.py"])])
def test_the_lines_a_chapter_quotes_from_the_code_are_the_codes(chapter, sources):
    """Chapter 6 quotes DoRAFunction's forward and backward and their helpers from
    dora_minimal/core.py, chapter 8 MergedWeight's backward from dora_minimal/routes.py, in ```py
    blocks (shown, not run): each quoted line's code (without its comment) is a line of that
    file."""
    def code(line):
        return line.split("  #")[0].strip()
    source = {code(line) for name in sources
              for line in (ROOT / "dora_minimal" / name).read_text().splitlines()}
    text = (ROOT / "tutorial" / f"{chapter}.md").read_text()
    quoted = re.findall(r"^ *```py\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)
    assert quoted, f"{chapter}.md quotes no code"
    for block in quoted:
        for line in block.splitlines():
            assert code(line) in source, line


def test_chapter_6_names_no_route_machinery():
    """Chapter 6 teaches the core alone; the routes that compute the same faster are chapter 8's."""
    text = (ROOT / "tutorial" / "06_pytorch.md").read_text()
    named = re.findall(r"choose_route|MergedWeight|route_apply|merged_weight|\bblocked\b|"
                       r"force_route|dora_minimal/routes|routes\.py", text)
    assert not named, f"06_pytorch.md names {sorted(set(named))}: they belong in 08_cost.md"


# The published timings: every line of these files with a time (ms, µs, s, minutes) or a ratio
# (1.30×, but not a target "≤ 1.35×"), outside code blocks, and every row of a table whose header
# has a time unit, has within TIMING_WINDOW lines of it or of the start of its paragraph or table
# a marker "measured YYYY-MM-DD with torch X.Y.Z"
# (X.Y.Z the torch .ci/run tests, so that a torch upgrade calls for measuring again) and the
# command that measured it, in backquotes (`python -m ...` or `python .ci/...`), which must still
# run as written (its module exists and accepts its options). An estimate says "not measured".
# Where the repository's history is at hand (a git clone, not a shallow one), no marker's date
# may be older than the last commit that changed dora_minimal/: changed code is measured again.
TIMED_DOCUMENTS = [ROOT / "README.md", ROOT / "tutorial" / "07_toy_model.md",
                   ROOT / "tutorial" / "08_cost.md"]
TIMING_WINDOW = 12
TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|µs|s|min|minutes?|seconds?|hours?)\b"
                    r"|(?<!≤ )(?<![\w.])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?×")
TIME_UNIT = re.compile(r"(?<![\w'’])(?:ms|µs|s|min|minutes)\b")
MARKER = re.compile(r"measured\s+(\d{4}-\d{2}-\d{2})\s+with\s+torch\s+(\d+\.\d+\.\d+)(?:\+\w+)?")
COMMAND = re.compile(r"`(?:time\s+)?python\s+(-m\s+[\w.]+|\.ci/[\w.]+)([^`]*)`")


def prose_lines(text):
    """[(line number, line, first line of its paragraph or table, whether it is a row of a
    table with times)] for the lines outside ``` blocks."""
    lines, fenced, timed_table, start = [], False, False, 1
    previous = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if not previous.strip() or previous.startswith("|") != line.startswith("|"):
            start = number  # a paragraph or a table begins
            timed_table = line.startswith("|") and bool(TIME_UNIT.search(line))  # its header
        previous = line
        lines.append((number, line, start, timed_table and bool(re.search(r"\d", line))))
    return lines


def command_problem(module, options):
    """Why the command `python {module} {options}` would not run as written, or None."""
    if module.startswith(".ci/"):
        return None if (ROOT / module).is_file() else f"{module} does not exist"
    name = module.removeprefix("-m").strip()
    path = ROOT / Path(*name.split("."))
    if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
        return f"no module {name}"
    parser_module = name if path.with_suffix(".py").is_file() else f"{name}.__main__"
    parse_args = getattr(importlib.import_module(parser_module), "parse_args", None)
    if parse_args is not None:
        try:
            parse_args(shlex.split(options))
        except SystemExit:
            return f"{name} refuses the options {options.strip()!r}"
    return None


def code_last_changed():
    """The date of the last commit that changed dora_minimal/, or None without a full history."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        if git("rev-parse", "--is-shallow-repository") != "false":
            return None
        day = git("log", "-1", "--format=%cs", "--", "dora_minimal")
    except (OSError, subprocess.CalledProcessError):
        return None
    return date.fromisoformat(day) if day else None


def test_ci_pins_the_torch_the_timings_name():
    assert re.search(r"torch==(\d+\.\d+\.\d+)", (ROOT / ".ci" / "run").read_text())


@pytest.mark.parametrize("path", TIMED_DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_published_timing_is_dated_with_its_torch_and_command(path):
    tested_torch = re.search(r"torch==(\d+\.\d+\.\d+)", (ROOT / ".ci" / "run").read_text())[1]
    changed = code_last_changed()
    text = path.read_text()
    all_lines = text.splitlines()
    for number, line, start, table_row in prose_lines(text):
        if not (TIMING.search(line) or table_row):
            continue
        # the lines around it, and around the start of its paragraph or table
        window = "\n".join(all_lines[max(0, start - 1 - TIMING_WINDOW):number + TIMING_WINDOW])
        where = f"{path.name}:{number}: {line.strip()[:70]!r}"
        if "not measured" in window:
            continue
        markers = MARKER.findall(window)
        assert markers, (f"{where} has a number measured without a 'measured YYYY-MM-DD with "
                         f"torch {tested_torch}' marker within {TIMING_WINDOW} lines")
        for day, version in markers:
            assert date.fromisoformat(day) <= date.today(), f"{where}: measured in the future"
            assert changed is None or date.fromisoformat(day) >= changed, (
                f"{where}: measured {day}, but dora_minimal/ changed on {changed}: measure it "
                f"again")
            assert version == tested_torch, (f"{where}: measured with torch {version}, but CI "
                                             f"tests torch {tested_torch}: measure it again")
        commands = COMMAND.findall(window)
        assert commands, f"{where}: no `python ...` command within {TIMING_WINDOW} lines"
        for module, options in commands:
            problem = command_problem(module, options)
            assert problem is None, f"{where}: the command `python {module}{options}`: {problem}"
