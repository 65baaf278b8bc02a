"""Every Python code block of README.md and tutorial/*.md runs, and every output it shows is
what the code prints.

A ```python block with `>>>` prompts runs as a doctest (its shown output is checked); one
without prompts is executed. The blocks of one file share their names, in order, as a reader
running them one after another would. Blocks run in a temporary directory.
"""

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "tutorial").glob("[0-9]*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


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
