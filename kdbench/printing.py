"""How the commands print: rich tables on a terminal; into a file or a pipe, plain aligned text at full
width; a large plan as a summary.
"""

from __future__ import annotations
import time
from rich import box
from rich.console import Console
from rich.table import Table
from kdbench.plan import STORED_ROLES


out = Console()
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole: paths must stay copyable
DRY_RUN_LISTED = 200  # a dry run lists plans of up to this many jobs; larger ones get a summary (--all lists them)
SUMMARY_PAIRS = 50  # pairs shown in a summary's per-pair table


def print_table(table: Table) -> None:
    """A table on a terminal; into a file or a pipe, plain aligned text at full width: no cell cut to 80 columns,
    no box lines, every column kept (model names, keys)."""
    if out.is_terminal:
        out.print(table)
        return
    rows = [[str(c.header) for c in table.columns]] + [[str(cell) for cell in row]
                                                        for row in zip(*(c.cells for c in table.columns))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.columns))]
    right = [c.justify == "right" for c in table.columns]
    lines = [str(table.title)] if table.title else []
    lines += ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip() for row in rows]
    lines += [str(table.caption)] if table.caption else []
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def pairs_table(plan) -> Table:
    table = Table(title=f"{plan.suite.name}: {len(plan.pairs)} pairs", box=box.SIMPLE_HEAD)
    for col in ("teacher", "params M", "MACs M", "student", "params M", "MACs M", "gap"):
        names = col in ("teacher", "student")
        table.add_column(col, justify="left" if names else "right", no_wrap=names)
    for p in plan.pairs:
        table.add_row(p.teacher.name, f"{p.teacher.params / 1e6:.2f}", f"{p.teacher.macs / 1e6:.1f}",
                      p.student.name, f"{p.student.params / 1e6:.2f}", f"{p.student.macs / 1e6:.1f}", f"{p.gap:.1f}")
    return table


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def print_entries(title: str, entries) -> None:
    """Plain aligned lines, never cut to the terminal's width: keys and paths stay whole and copyable."""
    rows = [("key", "kind", "model", "role", "size", "date")]
    rows += [(e.key, e.kind, e.model or "-", e.role or "-", size_text(e.size),
              time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out.print(title, markup=False, highlight=False, soft_wrap=True)
    for r in rows:
        out.print("  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip(),
                  markup=False, highlight=False, soft_wrap=True)


def print_plan(plan, store, every_job: bool = False) -> None:
    if every_job or len(plan.jobs) <= DRY_RUN_LISTED:
        print_table(pairs_table(plan))
        print_table(jobs_table(plan, store))
        return
    print_summary(plan, store)


def jobs_table(plan, store) -> Table:
    table = Table(title=f"{len(plan.jobs)} jobs, {len(plan.cells)} cells", box=box.SIMPLE_HEAD)
    for col in ("#", "role", "model", "method", "seed", "teacher", "epochs", "key", "store"):
        table.add_column(col, no_wrap=col in ("model", "teacher", "method"))
    for i, job in enumerate(plan.jobs, 1):
        stored = "reuse" if job.role in STORED_ROLES and store.has(job.key) else ""
        teacher = (job.teacher_model or "") + (" (fresh)" if job.teacher_init == "random" else "")
        teacher += "".join(f" > {a}" for a in job.assistants)
        table.add_row(str(i), job.role, job.model, job.method.label, str(job.seed), teacher,
                      str(job.train.epochs), job.key, stored)
    return table


def count_table(title: str, columns: tuple[str, ...], rows: dict[str, tuple[int, ...]], more: int = 0) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, caption=f"and {more} more (--all lists them)" if more else None)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if i else "left", no_wrap=not i)
    for name, counts in rows.items():
        table.add_row(name, *map(str, counts))
    return table


def print_summary(plan, store) -> None:
    """A large plan in counts (jobs per role and stored models reused; cells and student jobs per method and per
    pair), not one line per job: thousands of lines help no one see what will run."""
    roles: dict[str, list[int]] = {}
    for job in plan.jobs:
        counts = roles.setdefault(job.role, [0, 0])
        counts[0] += 1
        counts[1] += int(job.role in STORED_ROLES and store.has(job.key))
    groups: dict[str, dict[str, tuple[list, set]]] = {"method": {}, "pair": {}}
    for cell in plan.cells:
        for kind, name in (("method", cell.method), ("pair", cell.pair.name)):
            cells, jobs = groups[kind].setdefault(name, ([], set()))
            cells.append(cell)
            jobs.add(cell.job)
    methods, pairs = ({name: (len(c), len(j)) for name, (c, j) in groups[k].items()} for k in ("method", "pair"))
    seeds = len({c.seed for c in plan.cells})
    out.print(f"{plan.suite.name}: {len(plan.pairs)} pairs x {len(methods)} methods x {seeds} seeds = "
              f"{len(plan.cells)} cells, {len(plan.jobs)} jobs; a summary: `--dry-run --all` lists every job",
              markup=False, highlight=False, soft_wrap=True)
    print_table(count_table("jobs by role", ("role", "jobs", "reuse"), {r: tuple(c) for r, c in roles.items()}))
    print_table(count_table("by method", ("method", "cells", "student jobs"), methods))
    shown = dict(list(pairs.items())[:SUMMARY_PAIRS])
    print_table(count_table("by pair", ("pair", "cells", "student jobs"), shown, len(pairs) - len(shown)))
