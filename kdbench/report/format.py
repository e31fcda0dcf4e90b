"""Number formats and table syntax (Markdown, LaTeX), and atomic file writes for reports.
"""

from __future__ import annotations
import math
from pathlib import Path
import pandas as pd
from kdbench.storage.files import atomic_write


# ---------------------------------------------------------------------------------------------- formatting

DASH = "–"


def number(value: float, digits: int = 2, sign: bool = False) -> str:
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return text.replace("-", "−")  # a true minus: columns of signed numbers line up


def spread(mean: float, std: float, digits: int = 2, sign: bool = False, pm: str = " ± ") -> str:
    text = number(mean, digits, sign)
    return text if math.isnan(std) else f"{text}{pm}{number(std, digits)}"


def interval(low: float, high: float, digits: int = 2, sign: bool = False) -> str:
    """A confidence interval as "[a, b]"; empty when it is undefined (one seed)."""
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{number(low, digits, sign)}, {number(high, digits, sign)}]"


def p_value(p: float) -> str:
    if math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


LATEX_SPECIALS = (("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"),
                  ("^", r"\^{}"), ("~", r"\textasciitilde{}"), ("→", r"$\to$"), ("−", "-"), ("Δ", r"$\Delta$"),
                  ("×", r"$\times$"), ("–", "--"), ("±", r"$\pm$"), ("†", r"$^\dagger$"))


def latex_escape(text: str) -> str:
    text = text.replace("\\", "\x00")  # backslashes first, restored last: their replacement has braces
    for special, escaped in LATEX_SPECIALS:
        text = text.replace(special, escaped)
    return text.replace("\x00", r"\textbackslash{}")


def latex_table(header: list[str], rows: list[list[str]], align: str, caption: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_text(path, frame.to_csv(index=False, float_format="%.6f", lineterminator="\n"))


def write_text(path: Path, text: str) -> None:
    """Every report file is written atomically: a kill leaves the old file or the new one, never half of one."""
    atomic_write(path, text.encode())
