"""The package imports its names lazily: the NumPy reference, chapters 1-5 and the exercises run
without loading torch, and every public name still works."""

import subprocess
import sys
from pathlib import Path

import pytest

import dora_minimal

ROOT = Path(__file__).resolve().parent.parent
NUMPY_CHAPTERS = ["00_lora", "01_decompose", "02_adapt", "03_recombine", "04_merge",
                  "05_gradients"]


def modules_loaded_by(code):
    """Run code in a fresh interpreter at the repository's root; the set of top-level modules
    it left in sys.modules beyond a bare interpreter's."""
    report = "\nimport sys\nprint(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    result = subprocess.run([sys.executable, "-c", code + report], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize("statement", ["from dora_minimal import reference",
                                       "import dora_minimal.reference",
                                       "import dora_minimal as dm; dm.reference"])
def test_the_numpy_reference_imports_without_torch(statement):
    loaded = modules_loaded_by(f"{statement}\nimport dora_minimal.reference as r\n"
                               "import numpy as np\nr.decompose(np.ones((2, 3)))")
    assert "numpy" in loaded and "dora_minimal" in loaded
    assert "torch" not in loaded


def test_numpy_chapters_and_the_exercises_run_without_torch():
    paths = [f"tutorial/{chapter}.md" for chapter in NUMPY_CHAPTERS]
    loaded = modules_loaded_by(
        "import doctest\n"
        "flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE\n"
        f"for path in {paths!r}:\n"
        "    result = doctest.testfile(path, module_relative=False, optionflags=flags)\n"
        "    assert result.attempted > 0 and result.failed == 0, (path, result)\n"
        "import tutorial.exercises.dora")
    assert "torch" not in loaded


def test_a_pytorch_name_loads_torch():
    loaded = modules_loaded_by("from dora_minimal import DoRALinear")
    assert "torch" in loaded


def test_every_public_name_is_the_object_its_module_defines():
    import importlib
    assert "DoRALinear" in dir(dora_minimal) and "reference" in dir(dora_minimal)
    assert set(dora_minimal.__all__) <= set(dir(dora_minimal))
    for name in dora_minimal.__all__:
        value = getattr(dora_minimal, name)
        if name == "reference":
            assert value is importlib.import_module("dora_minimal.reference")
            continue
        module = importlib.import_module(f"dora_minimal.{dora_minimal._NAMES[name]}")
        assert value is getattr(module, name), name
    from dora_minimal import (DoRAFunction, DoRALinear, LoraConfig, dora_linear,  # noqa: F401
                              get_peft_model)
    assert dora_minimal.core.DoRAFunction is DoRAFunction  # a submodule, as an attribute


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'dora_minimal' has no attribute 'DoraLinear'"):
        dora_minimal.DoraLinear
    with pytest.raises(ImportError, match="cannot import name 'nothing'"):
        from dora_minimal import nothing  # noqa: F401
    with pytest.raises(AttributeError):  # the command runs (python -m), it is not imported
        dora_minimal.__getattr__("__main__")
