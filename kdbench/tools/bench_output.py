"""`kdbench bench`'s results as a terminal table, Markdown, CSV and JSON.
"""

from __future__ import annotations
import csv
import io
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from kdbench.tools.bench_setup import BenchResult, CPU_IMAGES_PER_ROUND, Row


# ---------------------------------------------------------------------------------------------------- output


def short(model: str) -> str:
    return model.removeprefix("cifar_")


def _fmt_rate(r: Row) -> tuple[str, str]:
    return f"{r.median:,.0f}", f"{min(r.rates):,.0f}-{max(r.rates):,.0f}"


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def _minutes(m: float) -> str:
    return f"{m:,.1f} min" if m < 120 else f"{m / 60:,.1f} h"


COLUMNS = ("pair", "batch", "loop", "img/s", "min-max", "TFLOP/s", "of peak", "240 epochs", "kdbench/classic",
           "kdbench/ceiling")


def table_rows(result: BenchResult) -> list[list[str]]:
    out = []
    for r in result.rows:
        median, spread = _fmt_rate(r)
        ours = r.loop == "kdbench"
        out.append([f"{short(r.teacher)} -> {short(r.student)}", str(r.batch_size), r.loop, median, spread, f"{r.tflops:.3f}",
                    f"{100 * r.of_peak:.1f}%", _minutes(r.projected_minutes),
                    _fmt_ratio(result.ratio(r, "classic")) if ours else "",
                    _fmt_ratio(result.ratio(r, "ceiling")) if ours else ""])
    return out


def header_lines(result: BenchResult) -> list[str]:
    s = result.settings
    steps = s["steps"] or f"{CPU_IMAGES_PER_ROUND} images' worth of"
    lines = [f"device: {result.device} ({result.device_name})",
             f"torch {result.torch_version}, torchvision {result.torchvision_version}; {result.date}",
             f"command: {result.command}",
             f"data: {s['dataset']} (50,000 CIFAR-100-shaped uint8 images, 100 classes); {s['rounds']} rounds x "
             f"{steps} timed steps per loop, interleaved; classic DataLoader workers: {s['workers']}",
             f"matrix peak: {result.peak / 1e12:.3f} TFLOP/s ({result.peak_how}, measured; the higher of two "
             f"measurements, before and after the loops)"]
    lines.append(f"torch.compile: {s.get('compile_mode') or 'off'}")
    if result.load_before is not None:
        lines.append(f"load average (1, 5, 15 min) before: {result.load_before}, after: {result.load_after} "
                     f"on {os.cpu_count()} cores")
    return lines


def compile_lines(result: BenchResult) -> list[str]:
    return [f"compile {short(c['model'])} ({c['role']}, batch {c['batch_size']}, {c['mode']}): {c['seconds']:.1f} s "
            f"(first {c['first_calls_s']:.1f} s, steady {c['steady_calls_s']:.2f} s for the same calls)"
            for c in result.compile]


def cell_lines(cell: dict) -> list[str]:
    p = cell["protocol"]
    return [
        f"cell: {cell['pair']}, methods {', '.join(cell['methods'])} x seeds {cell['seeds']}; {cell['train_size']} "
        f"images x {cell['epochs']} epochs, batch {cell['batch_size']}",
        f"without shared teacher outputs: {cell['without_s']:.1f} s, {cell['teacher_images_without']:,} teacher "
        f"forwards (images)",
        f"with shared teacher outputs:    {cell['with_s']:.1f} s, {cell['teacher_images_with']:,} teacher forwards "
        f"({cell['fill_s']:.1f} s of fills; cache {cell['cache_mb']:.1f} MiB); saving {100 * cell['saving']:.1f}%",
        f"every loss and accuracy identical with and without: {'yes' if cell['identical'] else 'NO'}"
        + ("" if cell["identical"] else f" (largest relative difference {cell.get('max_rel_diff', float('nan')):.2g}"
           + ("; expected with torch.compile: shared outputs come from the eager teacher, the steps from the "
              "compiled one" if cell.get("compiled") else "") + ")"),
        f"projected to the protocol's cell ({p['runs']} runs x {p['epochs']} epochs x {p['train_images']:,} images; "
        f"{p['distinct_views_per_image']:.1f} distinct views per image): {p['without_h']:.1f} h without, "
        f"{p['with_h']:.1f} h with (saving {100 * p['saving']:.0f}%); cache {p['cache_gb']:.2f} GB",
    ]


def print_result(result: BenchResult, console) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal:  # a log or a pipe: room for every column rather than rich's default 80
        console = Console(file=console.file, width=max(console.width, 140))

    for line in header_lines(result):
        console.print(line, highlight=False, markup=False)
    table = Table(box=box.SIMPLE_HEAD)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("pair", "loop") else "right", no_wrap=col == "pair")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    for line in compile_lines(result):
        console.print(line, highlight=False, markup=False)
    if result.cell:
        for line in cell_lines(result.cell):
            console.print(line, highlight=False, markup=False)


def markdown(result: BenchResult) -> str:
    lines = [f"# kdbench bench: {result.device_name}", ""] + [f"- {l}" for l in header_lines(result)] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c in ("pair", "loop") else "---:" for c in COLUMNS) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", "Models are kdbench's `cifar_*` timm models (prefix left out above). "
              "img/s: training images per second (median over rounds; min-max across rounds). TFLOP/s and "
              "'of peak': model FLOPs (2 x (3 x student MACs + teacher MACs) per image) at the median rate, over "
              "the measured matrix peak. '240 epochs': 240 x 50,000 images at the median rate (training only; "
              "evaluation adds a student forward of 10,000 images per epoch). Ratios: median of per-round ratios "
              "(the loops are interleaved, so each round's three numbers share the machine's state)."]
    if result.compile:
        lines += ["", "## Compile cost per model", "", "The first 3 calls of the compiled model (tracing, inductor, "
                  "recording CUDA graphs) beyond 3 steady calls; the teacher under no_grad, the student forward "
                  "and backward.", ""] + [f"- {l}" for l in compile_lines(result)]
    if result.cell:
        lines += ["", "## Shared teacher outputs", ""] + [f"- {l}" for l in cell_lines(result.cell)]
    return "\n".join(lines) + "\n"


def to_json(result: BenchResult) -> dict:
    out = asdict(result)
    out["rows"] = [{**asdict(r), "median": r.median, "tflops": r.tflops, "of_peak": r.of_peak,
                    "projected_240_epochs_min": r.projected_minutes,
                    "kdbench_over_classic": result.ratio(r, "classic") if r.loop == "kdbench" else None,
                    "kdbench_over_ceiling": result.ratio(r, "ceiling") if r.loop == "kdbench" else None}
                   for r in result.rows]
    return out


def slug(result: BenchResult) -> str:
    if result.device.startswith("cuda"):
        name = result.device_name
    else:
        name = "cpu " + result.device_name.split(",")[0]
    name = re.sub(r"\((r|tm)\)|\bcpu\b(?=.*\bcpu\b)|@.*", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_result(result: BenchResult, folder: Path) -> list[Path]:
    """<folder>/<device>.md, .csv and .json (a later run on the same device replaces them)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / slug(result)
    data = to_json(result)
    buf = io.StringIO()
    fields = ["teacher", "student", "batch_size", "loop", "median", "rates", "tflops", "of_peak",
              "projected_240_epochs_min", "kdbench_over_classic", "kdbench_over_ceiling"]
    writer = csv.DictWriter(buf, fieldnames=["device", "device_name", "torch_version", "date"] + fields)
    writer.writeheader()
    for row in data["rows"]:
        writer.writerow({"device": result.device, "device_name": result.device_name,
                         "torch_version": result.torch_version, "date": result.date,
                         **{k: (" ".join(f"{x:.1f}" for x in row[k]) if k == "rates" else row[k]) for k in fields}})
    paths = [base.with_suffix(".md"), base.with_suffix(".csv"), base.with_suffix(".json")]
    paths[0].write_text(markdown(result))
    paths[1].write_text(buf.getvalue())
    paths[2].write_text(json.dumps(data, indent=1, default=str) + "\n")
    return paths
