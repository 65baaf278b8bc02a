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
from code import InteractiveConsole
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


def test_the_lines_chapter_6_quotes_from_the_core_are_the_cores():
    """Chapter 6 quotes DoRAFunction's forward and backward and MergedWeight's backward in ```py
    blocks (shown, not run): each quoted line's code (without its comment) is a line of
    dora_minimal/core.py or dora_minimal/routes.py."""
    def code(line):
        return line.split("  #")[0].strip()
    core = {code(line) for name in ("core.py", "routes.py")
            for line in (ROOT / "dora_minimal" / name).read_text().splitlines()}
    text = (ROOT / "tutorial" / "06_pytorch.md").read_text()
    quoted = re.findall(r"^```py\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert len(quoted) == 3
    for block in quoted:
        for line in block.splitlines():
            assert code(line) in core, line
