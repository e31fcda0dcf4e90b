"""The `kdbench` command line: run, report, pairs, methods, bench."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from kdbench import KdbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdbench: knowledge distillation benchmarks on timm models, logged to MLflow.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole: paths must stay copyable

SuiteArg = typer.Argument(..., help="suite file (YAML)", show_default=False)


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _load_plan(suite_path: Path, methods: Optional[str] = None, seeds: Optional[str] = None,
               epochs: Optional[int] = None):
    from kdbench.plan import make_plan
    from kdbench.suite import load_suite

    suite = load_suite(suite_path)
    seed_list = None
    if seeds:
        try:
            seed_list = [int(s) for s in _csv(seeds)]
        except ValueError:
            raise KdbenchError(f"--seeds: expected comma-separated non-negative integers, got '{seeds}'") from None
    if epochs is not None and epochs < 1:
        raise KdbenchError(f"--epochs: expected a positive integer, got {epochs}")
    return make_plan(suite, suite_path, methods=_csv(methods), seeds=seed_list, epochs=epochs)


def _pairs_table(plan) -> Table:
    table = Table(title=f"{plan.suite.name}: {len(plan.pairs)} pairs", box=box.SIMPLE_HEAD)
    for col in ("teacher", "params M", "MACs M", "student", "params M", "MACs M", "gap"):
        names = col in ("teacher", "student")
        table.add_column(col, justify="left" if names else "right", no_wrap=names)
    for p in plan.pairs:
        table.add_row(p.teacher.name, f"{p.teacher.params / 1e6:.2f}", f"{p.teacher.macs / 1e6:.1f}",
                      p.student.name, f"{p.student.params / 1e6:.2f}", f"{p.student.macs / 1e6:.1f}", f"{p.gap:.1f}")
    return table


@app.command()
def pairs(suite: Path = SuiteArg) -> None:
    """Print the suite's teacher-student pairs with parameters, MACs and capacity gap (needs no data)."""
    out.print(_pairs_table(_load_plan(suite)))


@app.command()
def methods() -> None:
    """List the registered methods with their defaults."""
    from kdbench.registry import methods as registry

    table = Table(title="methods", box=box.SIMPLE_HEAD)
    for col in ("name", "defaults", "needs", "what it does"):
        table.add_column(col)
    for name, cls in registry().items():
        need = cls.needs(cls.defaults)
        needs = ", ".join(n for n, on in (
            (f"{need.teacher} teacher", need.teacher != "none"), ("trains the teacher", cls.trains_teacher),
            ("route checkpoints", need.route), (f"assistants ({', '.join(need.assistants)})", need.assistants),
            ("a validation split (data.val_size)", need.choice)) if on)
        needs = needs or "-"
        defaults = ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "-"
        table.add_row(name, defaults, needs, cls.summary)
    out.print(table)


@app.command()
def run(
    suite: Path = SuiteArg,
    methods: Optional[str] = typer.Option(None, help="only these method labels, comma-separated"),
    seeds: Optional[str] = typer.Option(None, help="these seeds instead of the suite's, comma-separated"),
    epochs: Optional[int] = typer.Option(None, help="shrink every schedule to this many epochs (milestones scale)"),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder [default: $KDBENCH_DATA]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and exit; touches no data and no MLflow"),
    fresh: bool = typer.Option(False, "--fresh", help="start a new parent run instead of continuing this plan's last one"),
    download: bool = typer.Option(False, "--download", help="let torchvision download a missing dataset"),
    teacher_cache: bool = typer.Option(False, "--teacher-cache", help="compute each teacher's logits once per image "
                                       "and view, shared by logit-only methods and seeds (same numbers, faster)"),
    executor: str = typer.Option("inprocess", "--executor", help="where the jobs run: inprocess"),
) -> None:
    """Run every job of a suite: teachers, then students of every method and seed, logged to MLflow."""
    plan = _load_plan(suite, methods, seeds, epochs)
    if dry_run:
        _print_plan(plan)
        return
    from kdbench.data import resolve_data_root
    from kdbench.executors import get_executor
    from kdbench.tracking import tracking_uri

    executor_cls = get_executor(executor)
    root = resolve_data_root(str(data_root) if data_root else None)
    outcome = executor_cls(plan, root, device, console=err, fresh=fresh, download=download,
                           teacher_cache=teacher_cache).run()
    already = f" ({outcome.skipped} already done before)" if outcome.skipped else ""
    err.print(f"{len(outcome.finished)} jobs finished{already}, {len(outcome.failed)} failed; MLflow {tracking_uri()}, "
              f"parent run {outcome.parent_run}")
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def report(
    suite: Path = SuiteArg,
    run_id: Optional[str] = typer.Option(None, "--run",
                                         help="the parent run id to report (default: the suite's latest run)"),
    out_dir: Path = typer.Option(Path("results"), "--out", help="write into OUT/<suite name>/"),
    x: str = typer.Option("gap", "--x", help="the figure's x axis: gap (teacher/student parameters) or teacher_acc"),
    methods: Optional[str] = typer.Option(None, "--methods",
                                          help="method labels to plot, comma-separated (default: every method)"),
    title: Optional[str] = typer.Option(None, "--title", help="the figure's title (default: the suite's display "
                                        "title, else the dataset and what is plotted)"),
) -> None:
    """Tables (Markdown, LaTeX, CSV) with confidence intervals and paired tests, and the accuracy-vs-gap figure
    (PNG, SVG, PDF) of a suite's run, read from MLflow."""
    from kdbench.report import write_report

    folder = write_report(suite, out_dir, run_id, x, methods=_csv(methods), title=title)
    err.print(f"report written to {folder}/ (report.md, comparison, cost, figure"
              f"{', paper_table' if (folder / 'paper_table.md').exists() else ''})")


@app.command()
def bench(
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N"),
    pairs: Optional[str] = typer.Option(None, help="teacher:student pairs, comma-separated "
                                        "[default: cifar_resnet56:cifar_resnet20,cifar_resnet32x4:cifar_resnet8x4]"),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="comma-separated [default: 64,512]"),
    rounds: Optional[int] = typer.Option(None, help="timed rounds per loop [default: 5 on GPU, 3 on CPU]"),
    steps: Optional[int] = typer.Option(None, help="timed steps per loop and round [default: 100 on GPU; 384 images' worth on CPU]"),
    workers: Optional[int] = typer.Option(None, help="the classic loop's DataLoader workers [default: min(8, cores)]"),
    loops: str = typer.Option("classic,kdbench,ceiling", help="which loops to measure"),
    dataset: str = typer.Option("synthetic", help="synthetic (CIFAR-100-shaped) or cifar100 (needs --data-root)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder [default: $KDBENCH_DATA]"),
    cache_cell: bool = typer.Option(False, "--cache-cell", help="also time a cell of 5 logit methods x 3 seeds "
                                    "without and with shared teacher outputs"),
    cell_train_size: Optional[int] = typer.Option(None, help="images in the cache cell [default: 50000 GPU, 128 CPU]"),
    cell_epochs: Optional[int] = typer.Option(None, help="epochs per run in the cache cell [default: 2]"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="also write <device>.md, .csv, .json into this folder"),
) -> None:
    """Measure training speed: the field's classic loop, kdbench's engine and the models' ceiling, side by side."""
    from kdbench.bench import BenchSettings, print_result, run_bench, write_result
    from kdbench.data import resolve_data_root

    def ints(value: Optional[str], option: str) -> Optional[tuple[int, ...]]:
        try:
            return tuple(int(v) for v in _csv(value)) if value else None
        except ValueError:
            raise KdbenchError(f"{option}: expected comma-separated integers, got '{value}'") from None

    pair_list = None
    if pairs:
        pair_list = tuple(tuple(p.split(":")) for p in _csv(pairs))
        if any(len(p) != 2 for p in pair_list):
            raise KdbenchError(f"--pairs: expected teacher:student pairs, comma-separated, got '{pairs}'")
    settings = BenchSettings(device=device, rounds=rounds, steps=steps, workers=workers, loops=tuple(_csv(loops) or ()),
                             dataset=dataset, data_root=resolve_data_root(str(data_root) if data_root else None),
                             cache_cell=cache_cell, cell_train_size=cell_train_size, cell_epochs=cell_epochs)
    if pair_list:
        settings.pairs = pair_list
    settings.batch_sizes = ints(batch_sizes, "--batch-sizes") or settings.batch_sizes
    if err.is_terminal:
        with err.status("kdbench bench") as status:
            result = run_bench(settings, progress=lambda what: status.update(f"kdbench bench: {what}"))
    else:  # a log: one line per stage, so a run cut short still shows how far it got
        result = run_bench(settings, progress=lambda what: err.print(f"kdbench bench: {what}", highlight=False,
                                                                     markup=False))
    print_result(result, out)
    if out_dir is not None:
        for path in write_result(result, out_dir):
            err.print(f"wrote {path}")


def _print_plan(plan) -> None:
    from kdbench.plan import STORED_ROLES
    from kdbench.store import ModelStore

    store = ModelStore()
    out.print(_pairs_table(plan))
    table = Table(title=f"{len(plan.jobs)} jobs, {len(plan.cells)} cells", box=box.SIMPLE_HEAD)
    for col in ("#", "role", "model", "method", "seed", "teacher", "epochs", "key", "store"):
        table.add_column(col, no_wrap=col in ("model", "teacher", "method"))
    for i, job in enumerate(plan.jobs, 1):
        stored = "reuse" if job.role in STORED_ROLES and store.has(job.key) else ""
        teacher = (job.teacher_model or "") + (" (fresh)" if job.teacher_init == "random" else "")
        teacher += "".join(f" > {a}" for a in job.assistants)
        table.add_row(str(i), job.role, job.model, job.method.label, str(job.seed), teacher,
                      str(job.train.epochs), job.key, stored)
    out.print(table)


def main() -> None:
    from kdbench.engine import Interrupted

    try:
        app()
    except KdbenchError as exc:
        err.print(f"kdbench: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Interrupted as exc:
        err.print(f"kdbench: interrupted ({exc}); run the same command again to resume", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
