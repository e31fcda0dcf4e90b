"""The `kdbench` commands (typer): run, report, validate, pairs, methods, store, bench.

Imported by `kdbench.cli.main` once its signal handlers are installed.
"""

from __future__ import annotations
from pathlib import Path
from typing import Optional
import typer
from rich import box
from rich.table import Table
from kdbench import KdbenchError
from kdbench.storage.store import ModelStore
from kdbench.plan import make_plan
from kdbench.runtime import runtime_config
from kdbench.config.load import load_suite
from kdbench.config.schema import MAX_EPOCHS, MAX_SEEDS
from kdbench.seeding import MAX_SEED
from kdbench.registry import methods as registry, modifiers as modifier_registry
from kdbench.data.spec import DataError
from kdbench.data.load import resolve_data_root
from kdbench.data.sources import cached_fingerprint
from kdbench.run.devices import devices_for_run, layout_line, leading, start_processes
from kdbench.run.follow import follow_suite
from kdbench.train import parallel
from kdbench.run.executors import get_executor, load_options
from kdbench.run.tune import tune_suite
from kdbench.tracking import Tracker
from kdbench.storage.files import check_writable, folder_size
from kdbench.mlflow_db import check_mlflow_db
from kdbench.tracking import check_tracking, referenced_keys, sqlite_path, tracking_uri
from kdbench.report.write import write_report
from kdbench.report.tuned import write_tuned_report
from kdbench.report.rank import load_study, rank as make_ranking
from kdbench.report.rank_output import write_ranking
from kdbench.tools.bench_setup import BenchSettings
from kdbench.tools.bench_output import print_result, write_result
from kdbench.tools.bench import run_bench
from kdbench.train.engine import EngineOptions
from kdbench.printing import DRY_RUN_LISTED, err, out, pairs_table, print_entries, print_plan, print_table, size_text


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdbench: knowledge distillation benchmarks on timm models, logged to MLflow.")

SuiteArg = typer.Argument(..., help="suite file (YAML)", show_default=False)
WORKERS_HELP = ("local: jobs run at once, each in its own worker process; 1 runs them in this process, one after "
                "another [default: the usable cores / --cpus-per-job on CPU; 1 on a GPU, one worker per device]")
STORE_HELP = "the model store: trained teachers, route checkpoints, assistants [default: $KDBENCH_STORE, else ./kdbench-store]"


def _store(path: Optional[Path]):
    return ModelStore(path)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _say(line: str) -> None:
    err.print(f"kdbench: {line}", markup=False, highlight=False)


def _check_database() -> None:
    """An MLflow SQLite database this MLflow cannot use (half-migrated, older, newer): refused in one line, or
    moved aside when it holds no runs (kdbench.mlflow_db)."""
    path = sqlite_path(tracking_uri())
    if path is not None:
        check_mlflow_db(path, notice=_say)


def _workers(executor: str, workers: Optional[int]) -> Optional[int]:
    """--workers is the local executor's; Ray packs jobs by --cpus-per-job, SLURM by its allocation."""
    if workers is not None and executor != "local" and not (executor == "inprocess" and workers == 1):
        raise KdbenchError(f"--workers: only the local executor runs worker processes (got --executor {executor}); "
                           f"ray and slurm pack jobs by --cpus-per-job and --gpus-per-job")
    if workers is not None and workers < 1:
        raise KdbenchError(f"--workers: expected a positive integer, got {workers}")
    return workers


def _for_devices(executor: str, executor_cls, world: int, workers: Optional[int]):
    """The executor of a run whose jobs each train on `world` devices: with the default local executor, torchrun's
    processes of this command, a job at a time (the in-process executor)."""
    if world == 1 or executor != "local":
        return executor, executor_cls
    if workers is not None and workers > 1:
        raise KdbenchError(f"--workers {workers} with --devices {world}: a job on several devices runs one job at "
                           "a time; leave --workers out")
    return "inprocess", get_executor("inprocess")


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def load_plan(suite_path: Path, methods: Optional[str] = None, seeds: Optional[str] = None,
              epochs: Optional[int] = None):
    """The suite validated and expanded into its plan: what `validate`, `pairs` and `run` start with.

    Raises a one-line KdbenchError naming the file, the field and what was expected; writes nothing.
    """

    suite = load_suite(suite_path)
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(s) for s in _csv(seeds) or []]
        except ValueError:
            seed_list = []
        if (not seed_list or any(not 0 <= s <= MAX_SEED for s in seed_list) or len(set(seed_list)) != len(seed_list)
                or len(seed_list) > MAX_SEEDS):
            raise KdbenchError(f"--seeds: expected comma-separated non-negative integers, each once, at most "
                               f"{MAX_SEED} and {MAX_SEEDS} of them, got '{_short(seeds)}'")
    if epochs is not None and not 1 <= epochs <= MAX_EPOCHS:
        raise KdbenchError(f"--epochs: expected a positive integer of at most {MAX_EPOCHS}, got {epochs}")
    return make_plan(suite, suite_path, methods=_csv(methods), seeds=seed_list, epochs=epochs)


def _data_error(suite_path: Path, exc: Exception) -> KdbenchError:
    """A dataset problem found at load time, named by the suite file and the data field it comes from."""
    text = str(exc)
    field = ("data.train_size" if " train: asked for the first" in text else
             "data.test_size" if " test: asked for the first" in text else
             "data.path" if text.startswith("imagefolder") else "data")
    return KdbenchError(f"{suite_path}: field '{field}': {text}")


@app.command()
def pairs(suite: Path = SuiteArg) -> None:
    """Print the suite's teacher-student pairs with parameters, MACs and capacity gap (needs no data)."""
    print_table(pairs_table(load_plan(suite)))


@app.command()
def validate(
    suite: Path = SuiteArg,
    methods: Optional[str] = typer.Option(None, help="only these method labels, comma-separated"),
    seeds: Optional[str] = typer.Option(None, help="these seeds instead of the suite's, comma-separated"),
    epochs: Optional[int] = typer.Option(None, help="shrink every schedule to this many epochs (milestones scale)"),
) -> None:
    """Check a suite and its plan (fields, models, methods against the models) without data or MLflow: exit 0 or 2."""
    plan = load_plan(suite, methods, seeds, epochs)
    roles: dict[str, int] = {}
    for job in plan.jobs:
        roles[job.role] = roles.get(job.role, 0) + 1
    labels = list(dict.fromkeys(c.method for c in plan.cells))
    seeds_used = sorted({c.seed for c in plan.cells})
    out.print(f"{suite}: valid. {plan.suite.name}: {len(plan.pairs)} pairs x {len(labels)} methods "
              f"({', '.join(labels)}) x {len(seeds_used)} seeds = {len(plan.cells)} cells; {len(plan.jobs)} jobs ("
              + ", ".join(f"{n} {r}" for r, n in roles.items()) + f"); data {plan.suite.data.dataset}",
              markup=False, highlight=False, soft_wrap=True)


@app.command()
def methods() -> None:
    """List the registered methods and modifiers with their defaults."""
    table = Table(title="methods", box=box.SIMPLE_HEAD,
                  caption="any method's loss terms can be combined by PCGrad: {method: NAME, combine: pcgrad}")
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
    print_table(table)
    table = Table(title="modifiers", box=box.SIMPLE_HEAD,
                  caption="with any method that declares logit losses: {method: kd, modify: logit_std} (label kd+logit_std)")
    for col in ("name", "defaults", "what it does"):
        table.add_column(col)
    for name, cls in modifier_registry().items():
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "-", cls.summary)
    print_table(table)


@app.command()
def run(
    suite: Path = SuiteArg,
    methods: Optional[str] = typer.Option(None, help="only these method labels, comma-separated"),
    seeds: Optional[str] = typer.Option(None, help="these seeds instead of the suite's, comma-separated"),
    epochs: Optional[int] = typer.Option(None, help="shrink every schedule to this many epochs (milestones scale)"),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder [default: $KDBENCH_DATA]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and exit; touches no data and no MLflow"),
    every_job: bool = typer.Option(False, "--all", help=f"with --dry-run: list every job, also for plans of more "
                                   f"than {DRY_RUN_LISTED} (otherwise summarised)"),
    fresh: bool = typer.Option(False, "--fresh", help="start a new parent run instead of continuing this plan's last one"),
    download: bool = typer.Option(False, "--download", help="let torchvision download a missing dataset"),
    teacher_cache: bool = typer.Option(False, "--teacher-cache", help="compute each teacher's logits once per image "
                                       "and view, shared by logit-only methods and seeds (same numbers, faster)"),
    executor: str = typer.Option("local", "--executor", help="where the jobs run: local (worker processes on "
                                 "this machine), inprocess, ray, slurm"),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP, show_default=False),
    executor_config: Optional[Path] = typer.Option(
        None, "--executor-config", help="per-machine executor options (YAML, a section per executor) "
        "[default: $KDBENCH_EXECUTOR_CONFIG, else ~/.config/kdbench/executor.yaml if present]"),
    cpus_per_job: Optional[float] = typer.Option(None, "--cpus-per-job", help="CPUs and torch threads per job, "
                                                 "in every executor (part of each job's key) [default: 1]"),
    gpus_per_job: Optional[float] = typer.Option(None, "--gpus-per-job", help="ray: GPUs per job, fractions pack "
                                                 "jobs (0.25: four per GPU); slurm: whole GPUs [default: 1 on "
                                                 "a GPU device, else 0]"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="ray: an existing cluster (auto, "
                                              "ray://head:10001) [default: start a local Ray]"),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: the partition"),
    mem_gb: Optional[float] = typer.Option(None, "--mem-gb", help="slurm: memory per job, GB"),
    time_min: Optional[int] = typer.Option(None, "--time-min", help="slurm: time limit per job, minutes (a job "
                                           "stopped by it is requeued and resumes) [default: 1440]"),
    slurm_logs: Optional[str] = typer.Option(None, "--slurm-logs", help="slurm: job log folder "
                                             "[default: <store>/slurm-logs/<suite>]"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the models for "
                                           "training steps (CUDA graphs on a GPU) [default: on for CUDA, off on CPU]"),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP, show_default=False),
    devices: Optional[int] = typer.Option(None, "--devices", help="each job on N devices, data parallel (batch_size "
                                          "the global batch): torchrun here, or --executor slurm's N-task jobs"),
) -> None:
    """Run every job of a suite: teachers, then students of every method and seed, logged to MLflow."""
    plan = load_plan(suite, methods, seeds, epochs)
    model_store = _store(store)

    executor_cls = get_executor(executor)
    options = load_options(executor, executor_config, cpus_per_job=cpus_per_job, gpus_per_job=gpus_per_job,
                           address=ray_address, partition=partition, mem_gb=mem_gb, time_min=time_min,
                           logs=slurm_logs, workers=_workers(executor, workers), devices_per_job=devices)
    world = devices_for_run(plan, executor, options.devices_per_job, compile, teacher_cache)
    executor, executor_cls = _for_devices(executor, executor_cls, world, workers)
    root = resolve_data_root(str(data_root) if data_root else None)
    if dry_run:  # keys as the run will make them where the data's fingerprint is known without reading the data
        runtime = runtime_config(EngineOptions.for_device(device).device.type, options.threads)
        print_plan(plan.for_data(cached_fingerprint(plan.suite.data.spec(), root)).for_runtime(runtime),
                    model_store, every_job)
        if world > 1:
            err.print(layout_line(plan, world), markup=False, highlight=False)
        return

    def make_runner(device: str, compile: Optional[bool]):
        return executor_cls(plan, root, device, console=err, fresh=fresh, download=download,
                            teacher_cache=teacher_cache, compile=compile, store=model_store, options=options)

    runner = make_runner(device, compile)  # checks the device and how many jobs it packs before anything is written
    check_tracking()  # before any data is read: a dead server or a read-only database is one line, at once
    _check_database()
    check_writable(model_store.root, "model store")
    if executor == "inprocess" and world > 1:  # torchrun's processes of this command (started here if need be)
        device, compile = start_processes(suite, world, device), False
        if not parallel.current().leads:  # the others train alongside the first process, which writes
            return follow_suite(model_store.root, root, device, download, err)
        runner = make_runner(device, compile)
    try:
        with leading():
            outcome = runner.run()
    except DataError as exc:  # the data is loaded before anything is written: name the suite and its field
        raise _data_error(suite, exc) from None
    _print_outcome(outcome)


def _print_outcome(outcome) -> None:
    """A run's last line: what finished, failed and collapsed, and where it is in MLflow; exit 1 on a failure."""
    where = f"MLflow {tracking_uri()}, parent run {outcome.parent_run}"
    if outcome.nothing_to_do:
        collapsed = f" ({len(outcome.collapsed)} collapsed)" if outcome.collapsed else ""
        err.print(f"nothing to do: {len(outcome.finished) + len(outcome.collapsed)} jobs already finished{collapsed}; "
                  f"{where} (--fresh starts a new run)")
        return
    already = f" ({outcome.skipped} already done before)" if outcome.skipped else ""
    err.print(f"{len(outcome.finished)} jobs finished{already}, {len(outcome.failed)} failed, "
              f"{len(outcome.collapsed)} collapsed; {where}")
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def tune(
    suite: Path = SuiteArg,
    methods: Optional[str] = typer.Option(None, help="only these method labels, comma-separated"),
    epochs: Optional[int] = typer.Option(None, help="shrink every schedule to this many epochs (milestones scale)"),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder [default: $KDBENCH_DATA]"),
    executor: str = typer.Option("local", "--executor", help="where the trials run: local (worker processes on "
                                 "this machine), inprocess, ray, slurm"),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP, show_default=False),
    cpus_per_job: Optional[float] = typer.Option(None, "--cpus-per-job", help="CPUs and torch threads per job, in "
                                                 "every executor (part of each job's key) [default: 1]"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="ray: an existing cluster"),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP, show_default=False),
) -> None:
    """Tune every method on validation with the suite's `tune:` budget, then run each at its default and its
    tuned setting on the reporting seeds (MLflow experiments <suite>.tune and <suite>.tuned). Resumes."""
    plan = load_plan(suite, methods, None, epochs)
    if plan.suite.tune is None:
        raise KdbenchError(f"{suite}: field 'tune': required by `kdbench tune` (trials, seeds, pairs, sampler)")
    model_store = _store(store)
    backend = get_executor(executor)
    options = load_options(executor, None, cpus_per_job=cpus_per_job, gpus_per_job=None, address=ray_address,
                           partition=None, mem_gb=None, time_min=None, logs=None, workers=_workers(executor, workers))
    root = resolve_data_root(str(data_root) if data_root else None)
    backend(plan, root, device, console=err, store=model_store, options=options)  # its checks, before any write
    check_tracking()
    check_writable(model_store.root, "model store")
    tracker = Tracker()

    def make_executor(cls, batch_plan):
        return cls(batch_plan, root, device, tracker=tracker, console=err, store=model_store, options=options)

    try:
        choices, outcome = tune_suite(plan, backend, make_executor, tracker, model_store, root, ray_address)
    except DataError as exc:
        raise _data_error(suite, exc) from None
    for name, chosen in choices.items():
        setting = ", ".join(f"{k} {v:.4g}" for k, v in chosen.params.items()) or "nothing to tune"
        err.print(f"{name}: trial {chosen.trial}, validation {chosen.value:.2f}%: {setting}")
    err.print(f"{len(outcome.finished)} reporting jobs finished, {len(outcome.failed)} failed; parent run "
              f"{outcome.parent_run}")
    if outcome.failed:
        raise typer.Exit(1)


@app.command(name="report-tuned")
def report_tuned(
    suite: Path = SuiteArg,
    out: Path = typer.Option(Path("results"), help="output folder: the report goes to OUT/<suite>.tuned/"),
) -> None:
    """Write the tuned report of a suite run by `kdbench tune`: default and tuned side by side, the chosen
    settings, the sensitivity of each method (tuned.md, CSVs, a figure)."""
    folder = write_tuned_report(suite, out)
    err.print(f"wrote {folder}")


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
    mlflow_artifacts: bool = typer.Option(True, "--mlflow-artifacts/--no-mlflow-artifacts", help="also log the "
                                          "report's files as artifacts of the suite's parent run (report/)"),
) -> None:
    """Tables (Markdown, LaTeX, CSV) with confidence intervals and paired tests, agreement with the teacher and
    calibration, and the accuracy-vs-gap figure (PNG, SVG, PDF) of a suite's run, read from MLflow; logged back to
    the suite's parent run as artifacts."""

    _check_database()
    try:
        folder = write_report(suite, out_dir, run_id, x, methods=_csv(methods), title=title, notice=_say,
                              log_artifacts=mlflow_artifacts)
    except PermissionError as exc:  # a results folder that cannot be written: one line naming it
        raise KdbenchError(f"{exc.filename or out_dir}: cannot be written ({exc.strerror}); choose another --out") from None
    err.print(f"report written to {folder}/ (report.md, comparison, cost, figure"
              f"{', paper_table' if (folder / 'paper_table.md').exists() else ''})")


@app.command()
def rank(
    sources: list[Path] = typer.Argument(..., help="suite files (their runs in MLFLOW_TRACKING_URI's store) or "
                                         "results folders holding their mlflow.db", show_default=False),
    out_dir: Path = typer.Option(Path("results/ranking"), "--out", help="write the ranking into this folder"),
    methods: Optional[str] = typer.Option(None, "--methods", help="rank only these methods, comma-separated "
                                          "(default: every method with a number in every task)"),
    by_label: bool = typer.Option(False, "--by-label", help="one method per label, even where its settings or code "
                                  "differ between suites (each suite's method at its own setting; the ranking lists "
                                  "the differences); by default such a label splits into one method per setting"),
) -> None:
    """Rank methods over every pair of one suite or of several: average rank, Friedman and Nemenyi tests with a
    critical-difference diagram, IQM gain over vanilla KD and probability of improving on it, with intervals."""
    note = lambda line: err.print(f"kdbench: {line}", markup=False, highlight=False)  # noqa: E731
    studies = [load_study(source, note) for source in sources]
    names = [s.suite.name for s in studies]
    if len(set(names)) < len(names):
        raise KdbenchError(f"suite '{next(n for n in names if names.count(n) > 1)}' is given twice")
    command = "kdbench rank " + " ".join(s.as_posix() for s in sources) + f" --out {out_dir.as_posix()}" + \
        (f" --methods {methods}" if methods else "") + (" --by-label" if by_label else "")
    folder = write_ranking(make_ranking(studies, _csv(methods), by_label), out_dir, command)
    err.print(f"ranking written to {folder}/ (ranking.md, ranking.csv, scores.csv, critical_difference)")


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
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the models for "
                                           "training steps (CUDA graphs on a GPU) [default: on for CUDA, off on CPU]"),
) -> None:
    """Measure training speed: the field's classic loop, kdbench's engine and the models' ceiling, side by side."""
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
                             cache_cell=cache_cell, cell_train_size=cell_train_size, cell_epochs=cell_epochs,
                             compile=compile)
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


store_app = typer.Typer(no_args_is_help=True, help="What the model store holds, and removing what no run refers to.")
app.add_typer(store_app, name="store")


@store_app.command("list")
def store_list(store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP, show_default=False)) -> None:
    """Every entry of the store (trained models, unfinished jobs' checkpoints, corrupted entries moved aside)."""
    model_store = _store(store)
    entries = model_store.entries()
    print_entries(f"{model_store.root}: {len(entries)} entries", entries)
    total = folder_size(model_store.root) if model_store.root.is_dir() else 0
    out.print(f"total {size_text(total)} in {model_store.root}", markup=False, highlight=False, soft_wrap=True)


@store_app.command("gc")
def store_gc(
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP, show_default=False),
    keep: Optional[list[Path]] = typer.Option(None, "--keep", help="also keep every model this suite's plan needs "
                                              "(repeatable)", show_default=False),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder, to key --keep suites' "
                                             "teachers by their data [default: $KDBENCH_DATA]"),
    yes: bool = typer.Option(False, "--yes", help="remove them; without it, only list what would be removed"),
) -> None:
    """Remove what no run refers to: entries whose key no run in the MLflow store (any status) names in a tag or
    param, and no --keep suite needs; corrupted entries always go. Lists them unless --yes."""

    model_store = _store(store)
    _check_database()
    referenced = referenced_keys()
    for path in keep or []:
        plan = load_plan(path)
        referenced |= {j.key for j in plan.for_data_root(resolve_data_root(str(data_root) if data_root else None)).jobs}
    doomed = model_store.unreferenced(referenced)
    total = sum(e.size for e in doomed)
    if not doomed:
        err.print(f"nothing to remove in {model_store.root}: every entry is referenced by a run in {tracking_uri()}",
                  markup=False, highlight=False)
        return
    print_entries(f"{'removing' if yes else 'would remove'} {len(doomed)} entries ({size_text(total)}) from "
                   f"{model_store.root}", doomed)
    if not yes:
        err.print("dry run: nothing removed; pass --yes to remove them", markup=False, highlight=False)
        return
    busy = [e for e in doomed if not model_store.remove(e)]
    freed = total - sum(e.size for e in busy)
    err.print(f"removed {len(doomed) - len(busy)} entries, {size_text(freed)} freed"
              + (f"; {len(busy)} in use by a running process, kept" if busy else ""), markup=False, highlight=False)
