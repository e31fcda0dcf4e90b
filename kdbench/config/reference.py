"""A paper suite's published table: read it, and check that every name in it is mapped.
"""

from __future__ import annotations
from pathlib import Path
import pandas as pd
from kdbench.config.schema import ReferenceConfig, Suite, SuiteError
from kdbench.zoo import known_models


CSV_COLUMNS = ["table", "dataset", "teacher", "student", "method", "value", "note"]


def read_reference(suite_path: Path, ref: ReferenceConfig) -> pd.DataFrame:
    """The rows of the suite's published table, in the paper's order; a one-line SuiteError if unusable."""
    path = (Path(suite_path).parent / ref.csv)
    if not path.is_file():
        raise SuiteError(f"{suite_path}: field 'reference.csv': no such file {path}")
    try:
        rows = pd.read_csv(path, comment="#", dtype={c: str for c in CSV_COLUMNS if c != "value"},
                           keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise SuiteError(f"{suite_path}: field 'reference.csv': cannot read {path}: {exc}") from None
    missing = [c for c in CSV_COLUMNS if c not in rows.columns]
    if missing:
        raise SuiteError(f"{suite_path}: field 'reference.csv': {path} lacks the columns {', '.join(missing)}")
    rows = rows[rows.table == ref.table].reset_index(drop=True)
    if not len(rows):
        raise SuiteError(f"{suite_path}: field 'reference.table': no table '{ref.table}' in {path}")
    return rows


def check_reference(suite_path: Path, suite: Suite) -> None:
    """Every model and row name of the published table is mapped; every model mapped to is a real one."""
    ref = suite.reference
    rows = read_reference(suite_path, ref)
    for field, names in (("models", list(rows.teacher) + list(rows.student)), ("methods", list(rows.method))):
        mapping = getattr(ref, field)
        for name in dict.fromkeys(names):
            if name not in mapping:
                raise SuiteError(f"{suite_path}: field 'reference.{field}': the paper's '{name}' is not mapped "
                                 f"(map it to ours, or to null where we have none)")
    # A mapped name the CSV never uses (in any of its tables) is a misspelling: its row would stay unmapped
    every = pd.read_csv(Path(suite_path).parent / ref.csv, comment="#", dtype=str, keep_default_na=False)
    for field, names in (("models", set(every.teacher) | set(every.student)), ("methods", set(every.method))):
        for name in getattr(ref, field):
            if name not in names:
                raise SuiteError(f"{suite_path}: field 'reference.{field}.{name}': the paper's table "
                                 f"({ref.csv}) has no {field[:-1]} '{name}'")
    for paper_name, ours in ref.models.items():
        if ours is not None and ours not in known_models():
            raise SuiteError(f"{suite_path}: field 'reference.models.{paper_name}': unknown model '{ours}'")
