"""Mutation testing: how many small changes to one source file its tests notice.

    pip install -e ".[mutation]"
    python .ci/mutation.py dora_minimal/reference.py tests/test_reference.py
    python .ci/mutation.py dora_minimal/reference.py tests/test_reference.py \
        tests/test_validation.py

mutmut changes the target file one operator, number, name or keyword argument at a time (a
"mutant") and runs the given tests against each mutant: a mutant that makes a test fail is
killed; one that every test passes survived. The run happens in a temporary copy of the
repository (mutmut writes a mutants/ folder beside the code), so this checkout is left as it was.

Each mutant is sorted by what its changed line does: the argument checks (a check_* call, a
`raise` and its message, the `if` that guards it) or the math, everything else. The score that
counts is the share of the math's mutants that are killed, leaving out the survivors that
tests/mutation_equivalents.md lists as equivalent (they compute the same function, so no test
can kill them). Printed: the counts, the score, and each surviving mutant's diff.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.md"
# what the copy leaves out: version control, environments, caches, earlier mutmut runs
NOT_COPIED = shutil.ignore_patterns(".git", "venv", ".venv", "mutants", ".hypothesis",
                                    ".pytest_cache", "__pycache__", "*.egg-info")
# a changed line that only checks the arguments: a check_* call, a raise, its message, its guard
CHECKING = re.compile(r"check_\w+\(|\braise\b|Error\(|^\s*f?\"|^\s*if not\b|^\s*if \w+\.size|"
                      r"\bnames=|\bneeds_\w+=|\bf\"|\bexpected\b")


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the file to mutate, e.g. dora_minimal/reference.py")
    parser.add_argument("tests", nargs="+", help="the test files to run against each mutant")
    parser.add_argument("--max-children", type=int, default=os.cpu_count(),
                        help="mutants tested in parallel (default: the number of CPUs)")
    parser.add_argument("--profile", default="mutation",
                        help="the hypothesis profile of the runs (default: mutation, the fast "
                             "profile with a fixed seed, so that two runs agree)")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="run in DIR (kept afterwards, for `mutmut browse` there) instead "
                             "of a temporary folder")
    return parser.parse_args()


def configure(copy, target, tests):
    """Point mutmut at the target and the tests, in the copy's pyproject.toml."""
    def toml_list(items):
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"
    with open(copy / "pyproject.toml", "a") as pyproject:
        pyproject.write(
            "\n[tool.mutmut]\n"
            f"source_paths = {toml_list([Path(target).parts[0]])}\n"
            f"only_mutate = {toml_list([target])}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            # a mutant that loops forever times out; randomly's reordering is not needed
            'pytest_add_cli_args = ["-p", "no:randomly", "-p", "no:cacheprovider"]\n')


def equivalent_survivors():
    """The mutant names listed in tests/mutation_equivalents.md (as `name` in a table row)."""
    if not EQUIVALENTS.is_file():
        return set()
    return set(re.findall(r"^\| `([\w.]+__mutmut_\d+)` \|", EQUIVALENTS.read_text(),
                          re.MULTILINE))


def changed_lines(diff):
    return [line[1:] for line in diff.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def report(copy, target, seconds):
    """Sort the mutants, print the counts and the survivors; return the score of the math."""
    os.chdir(copy)
    sys.path.insert(0, str(copy))
    from mutmut.__main__ import (SourceFileMutationData, get_diff_for_mutant,
                                 status_by_exit_code, walk_mutatable_files)
    statuses = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            statuses[name] = (status_by_exit_code[code], path)
    equivalents = equivalent_survivors()
    counts = {"math": [0, 0], "checks": [0, 0]}  # [killed, all]
    survivors = []
    for name, (status, path) in sorted(statuses.items()):
        diff = get_diff_for_mutant(name, path=path)
        kind = ("checks" if all(CHECKING.search(line) for line in changed_lines(diff))
                else "math")
        killed = status in ("killed", "timeout", "segfault")
        if kind == "math" and not killed and name in equivalents:
            continue  # equivalent: no test can kill it
        counts[kind][0] += killed
        counts[kind][1] += 1
        if not killed:
            survivors.append((name, kind, status, diff))
    for name, kind, status, diff in survivors:
        print(f"\n# {name}: {status} ({kind})\n{diff.strip()}")
    listed = equivalents & set(statuses)
    print(f"\n{target}: {len(statuses)} mutants in {seconds:.0f} s")
    print(f"  argument checks: {counts['checks'][0]} of {counts['checks'][1]} killed")
    print(f"  DoRA math: {counts['math'][0]} of {counts['math'][1]} killed, leaving out "
          f"{len(listed)} equivalent survivors listed in tests/mutation_equivalents.md")
    killed, total = counts["math"]
    score = 100.0 * killed / max(total, 1)
    print(f"  mutation score of the math: {score:.1f}%")
    stale = sorted(name for name in equivalents & set(statuses)
                   if statuses[name][0] in ("killed", "timeout"))
    if stale:
        print(f"  listed as equivalent but killed (update the list): {stale}")
    return score


def main():
    args = arguments()
    if shutil.which("mutmut") is None:
        sys.exit('mutmut is not installed: pip install -e ".[mutation]"')
    for path in [args.target, *args.tests]:
        if not (ROOT / path).is_file():
            sys.exit(f"{path}: no such file in the repository")
    with tempfile.TemporaryDirectory(prefix="dora_mutation_") as temporary:
        copy = args.keep.resolve() if args.keep else Path(temporary) / "repository"
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(ROOT, copy, ignore=NOT_COPIED)
        configure(copy, args.target, args.tests)
        # one thread per child: mutmut forks each child from a process that has run torch, and a
        # child forked from torch's thread pool can wait forever on a lock held by a thread it
        # does not have (seen as a "timeout", which would count as a kill)
        environment = dict(os.environ, HYPOTHESIS_PROFILE=args.profile, OMP_NUM_THREADS="1")
        start = time.perf_counter()
        run = subprocess.run(["mutmut", "run", "--max-children", str(args.max_children)],
                             cwd=copy, env=environment, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"mutmut run failed with exit status {run.returncode}")
        report(copy, args.target, seconds)


if __name__ == "__main__":
    main()
