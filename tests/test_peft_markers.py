"""Every test that needs PEFT, transformers, safetensors or accelerate (none is a dependency)
is marked `interop`, so that .ci/run's interop step, which installs them, runs it and fails if
any such test still skips. Read from the test files' source, without importing the packages."""

import ast
from pathlib import Path

OPTIONAL = ("peft", "transformers", "safetensors", "accelerate")
TESTS = Path(__file__).parent


def imports_optional(node):
    """Whether `node` holds a pytest.importorskip("<an optional package>...") call."""
    return any(isinstance(sub, ast.Call) and getattr(sub.func, "attr", "") == "importorskip"
               and isinstance(sub.args[0], ast.Constant)
               and str(sub.args[0].value).split(".")[0] in OPTIONAL for sub in ast.walk(node))


def needs_optional(function, functions, seen=()):
    """Whether a function, or a function of the module it calls, imports an optional package."""
    called = {sub.func.id for sub in ast.walk(function) if isinstance(sub, ast.Call)
              and isinstance(sub.func, ast.Name) and sub.func.id in functions}
    return imports_optional(function) or any(
        needs_optional(functions[name], functions, seen + (function.name,))
        for name in called - set(seen) - {function.name})


def unmarked(source):
    """The tests of a module's source that need an optional package but are not marked."""
    tree = ast.parse(source)
    module_mark = any(isinstance(node, ast.Assign) and "interop" in ast.unparse(node.value)
                      and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                      for node in tree.body)
    if module_mark:
        return []
    if any(imports_optional(node) for node in tree.body
           if not isinstance(node, (ast.FunctionDef, ast.ClassDef))):
        return ["<module>"]
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    return [name for name, function in functions.items() if name.startswith("test_")
            and needs_optional(function, functions)
            and not any("interop" in ast.unparse(d) for d in function.decorator_list)]


def test_every_test_that_needs_an_optional_package_is_marked_interop():
    found = {path.name: unmarked(path.read_text()) for path in sorted(TESTS.glob("test_*.py"))}
    assert {name: tests for name, tests in found.items() if tests} == {}
    assert sum(1 for path in TESTS.glob("test_*.py") if "interop" in path.read_text()) >= 6


def test_the_check_finds_an_unmarked_test_through_a_helper_and_a_module_level_import():
    helper = ('import pytest\ndef make():\n    return pytest.importorskip("peft.tuners")\n'
              'def test_a():\n    make()\ndef test_b():\n    pass\n')
    assert unmarked(helper) == ["test_a"]
    assert unmarked(helper.replace("def test_a", "@pytest.mark.interop\ndef test_a")) == []
    assert unmarked('import pytest\npeft = pytest.importorskip("peft")\n') == ["<module>"]
    assert unmarked('import pytest\npytestmark = pytest.mark.interop\n'
                    'peft = pytest.importorskip("peft")\n') == []
