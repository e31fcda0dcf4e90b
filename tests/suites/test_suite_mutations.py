"""Every validation error, at any depth, is one line naming the file, the field path and what was expected.

Proved by mutation on every shipped suite (papers included): each key at every depth misspelt, each leaf
given a value of the wrong type. Each mutant goes through `load_plan`, the function every command calls
first (validate, pairs, run), in this process; a sample goes through the real CLI in one subprocess,
which also shows exit code 2, no traceback and no MLflow database or model store written.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdbench import KdbenchError
from kdbench.commands import load_plan

from conftest import REPO
SUITES = sorted((REPO / "suites").rglob("*.yaml"))


def paths(node, loc=()):
    """(kind, loc) for every key ("key") and every leaf ("leaf") of a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield "key", loc + (key,)
            yield from paths(value, loc + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, loc + (i,))
    else:
        yield "leaf", loc


def wrong(value):
    """A value of another type: a number where text is expected, text where a number, a flag or null is."""
    return 12.5 if isinstance(value, str) or value is None else "not-a-number"


def mutate(raw, kind, loc):
    raw = copy.deepcopy(raw)
    parent = raw
    for key in loc[:-1]:
        parent = parent[key]
    last = loc[-1]
    if kind == "leaf":
        parent[last] = wrong(parent[last])
        return raw, loc
    items = list(parent.items())  # rename in place, order kept
    parent.clear()
    parent.update({(f"{k}x" if k == last else k): v for k, v in items})
    return raw, loc[:-1] + (f"{last}x",)


def mutants(tmp_path: Path):
    """(mutant file, kind, original loc, mutated loc) for every shipped suite; CSVs copied beside them."""
    for suite in SUITES:
        folder = tmp_path / suite.parent.relative_to(REPO)
        folder.mkdir(parents=True, exist_ok=True)
        for csv in suite.parent.glob("*.csv"):
            shutil.copy(csv, folder / csv.name)
        raw = yaml.safe_load(suite.read_text())
        for n, (kind, loc) in enumerate(paths(raw)):
            mutant, new_loc = mutate(raw, kind, loc)
            path = folder / f"{suite.stem}.{kind}{n}.yaml"
            path.write_text(yaml.dump(mutant, Dumper=yaml.CSafeDumper, sort_keys=False))
            yield path, kind, loc, new_loc


def test_every_key_and_leaf_of_every_shipped_suite(tmp_path):
    count = 0
    for path, kind, loc, new_loc in mutants(tmp_path / "mutants"):
        where = f"{kind} {'.'.join(map(str, loc))} of {path.name}"
        try:
            load_plan(path)
        except KdbenchError as exc:
            message = str(exc)
        else:
            pytest.fail(f"{where}: the mutant validated")
        assert "\n" not in message, where
        assert message.startswith(f"{path}: field '"), f"{where}: {message}"
        field = message.split("field '", 1)[1].split("'", 1)[0]
        assert field.split(".")[0] in (str(loc[0]), str(new_loc[0])), f"{where}: {message}"
        count += 1
    assert count > 500  # every suite, every depth: the walk really walked


def test_the_real_cli_on_a_sample(tmp_path):
    """One process runs `kdbench run` on a spread of mutants: exit 2, one line, no traceback, nothing written."""
    all_mutants = list(mutants(tmp_path / "mutants"))
    sample = [m[0] for m in all_mutants[:: max(1, len(all_mutants) // 12)]]
    script = """
import io, sys
from kdbench.cli import main
for path in sys.argv[1:]:
    sys.argv, sys.stderr = ["kdbench", "run", path], io.StringIO()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    err, sys.stderr = sys.stderr.getvalue(), sys.__stderr__
    print(repr((path, code, err)))
"""
    proc = subprocess.run([sys.executable, "-c", script, *map(str, sample)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    results = [eval(line) for line in proc.stdout.splitlines() if line.startswith("(")]  # noqa: S307 (our repr)
    assert len(results) == len(sample)
    for path, code, err in results:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (path, err)
        assert lines[0].startswith(f"kdbench: error: {path}: field '"), lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "store").exists()
