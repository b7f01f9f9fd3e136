"""The report of a sweep: a progress line per level, the table, `<out>.csv` and
`<out>.json`, and the two pictures."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hessd.tools._common import matplotlib
from hessd.tools.bench._statistics import PERCENTILES, Row

__all__ = ["COLUMNS", "format_table", "plot", "plot_title", "progress_line", "write_results"]

# The CSV's columns: every field of Row but the per-window statistics (those go to the JSON).
COLUMNS = tuple(f.name for f in dataclasses.fields(Row) if f.name != "window_stats")


def progress_line(row: Row) -> str:
    p95 = "-" if row.p95_ms is None else f"{row.p95_ms:.2f} ms"
    return (
        f"{_level_name(row)} {_format_level(row)}: {row.requests_per_s:.1f} req/s, "
        f"p95 {p95}, {row.errors} errors, {row.windows} windows, {row.status}"
    )


def _level_name(row: Row) -> str:
    return "concurrency" if row.mode == "concurrency" else "rate/s"


def _format_level(row: Row) -> str:
    return str(row.concurrency) if row.mode == "concurrency" else f"{row.request_rate:g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: Sequence[Row], batch: int) -> str:
    """One line per level; errors by status name in the last column."""
    open_loop = rows[0].mode == "request_rate"
    header = [_level_name(rows[0]), "req/s", "points/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms"]
    if open_loop:
        header += ["sent/s", "in-flight max"]
    header += ["windows", "status", "errors"]
    lines = []
    for row in rows:
        cells = [
            _format_level(row),
            f"{row.requests_per_s:.1f}",
            f"{row.points_per_s:.1f}",
            *(_ms(getattr(row, f"p{p}_ms")) for p in PERCENTILES),
        ]
        if open_loop:
            cells += [f"{row.sent_per_s:.1f}", str(row.in_flight_max or 0)]
        cells += [str(row.windows), row.status, _errors_text(row.errors_by_code)]
        lines.append(cells)
    widths = [max(len(h), *(len(cells[i]) for cells in lines)) for i, h in enumerate(header)]
    text = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for cells in lines:
        text.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    text.append(f"batch {batch}; latency of successful requests; rows from the last windows")
    return "\n".join(text)


def _errors_text(errors: Mapping[str, int]) -> str:
    return " ".join(f"{code}={n}" for code, n in errors.items()) or "0"


def write_results(out: Path, rows: Sequence[Row], metadata: Mapping[str, Any]) -> list[Path]:
    """`<out>.csv` (COLUMNS) and `<out>.json` ({"metadata", "rows"}); the paths written."""
    csv_path, json_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".json")
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            values = dataclasses.asdict(row)
            values["errors_by_code"] = " ".join(f"{c}={n}" for c, n in row.errors_by_code.items())
            writer.writerow({c: "" if values[c] is None else values[c] for c in COLUMNS})
    document = {"metadata": metadata, "rows": [dataclasses.asdict(row) for row in rows]}
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return [csv_path, json_path]


def plot_title(kind: str, expression: str, batch: int) -> str:
    """ "gradient of sum(tanh(A @ x)**2), batch 1", the expression cut to 50 characters."""
    expression = " ".join(expression.split())
    if len(expression) > 50:
        expression = expression[:47] + "..."
    return f"{kind} of {expression}, batch {batch}"


def plot(out: Path, rows: Sequence[Row], batch: int, title: str) -> list[Path]:
    """`<out>-throughput.png` (requests/s, and points/s on the right axis) and
    `<out>-latency.png` (p50 … p99) against the level; levels that are not stable are drawn
    with open markers."""
    Figure, FigureCanvasAgg = matplotlib()
    from matplotlib import ticker

    x = np.array([row.level for row in rows], dtype=float)
    stable = np.array([row.status == "stable" for row in rows])
    if not stable.all():
        title += "; open markers: not stable"
    paths = []

    def axes() -> tuple[Any, Any]:
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        ax = figure.subplots()
        # One tick per level, labelled as given: 1, 2, 4 … or the rates.
        ax.set_xscale("log")
        ax.set_xticks(x, [_format_level(row) for row in rows])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        if rows[0].mode == "concurrency":
            ax.set_xlabel("concurrency (requests in flight)")
        else:
            ax.set_xlabel("offered request rate (requests/s)")
        ax.set_title(title, fontsize="medium")
        return FigureCanvasAgg(figure), ax

    def draw(ax: Any, values: np.ndarray, label: str, color: str) -> None:
        ax.plot(x, values, "-", color=color, label=label)
        ax.plot(x[stable], values[stable], "o", color=color)
        ax.plot(x[~stable], values[~stable], "o", mfc="none", color=color)

    canvas, ax = axes()
    draw(ax, np.array([row.requests_per_s for row in rows]), "requests/s", "C0")
    if rows[0].mode == "request_rate":
        ax.plot(x, x, "--", color="gray", linewidth=0.8, label="offered")
    # points/s is requests/s times the batch: a second scale on the same curve.
    points = ax.secondary_yaxis("right", functions=(lambda r: r * batch, lambda p: p / batch))
    points.set_ylabel(f"points/s (batch {batch})")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    paths.append(out.with_name(out.name + "-throughput.png"))
    canvas.print_png(str(paths[-1]))

    canvas, ax = axes()
    for i, p in enumerate(PERCENTILES):
        values = [getattr(row, f"p{p}_ms") for row in rows]
        draw(ax, np.array([np.nan if v is None else v for v in values]), f"p{p}", f"C{i}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("latency of successful requests (ms)")
    ax.legend()
    paths.append(out.with_name(out.name + "-latency.png"))
    canvas.print_png(str(paths[-1]))
    return paths
