"""The report of a job: the summary table, and the picture (--plot).

The picture's left panel is the histogram of every eigenvalue at every point on a symlog
axis: logarithmic in |λ| on either side, linear within ±linthresh, a power of ten picked
from the data (the smallest 1% of the magnitudes above the server's tol). Its bins are of
equal width in that axis's coordinate, one centred on 0, so a bar's height compares with
every other's: bins of equal width in λ would crowd into the linear part, and geometric
bins (equal on the log parts) would leave a few wide bins there, each collecting several
decades' worth of eigenvalues. The right panel has the extreme eigenvalues per point, in
the order of the points file: along a training run, how the curvature evolves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hessd.proto.kinds import PointClass
from hessd.tools._common import Refused, matplotlib

__all__ = [
    "LINSCALE",
    "eigenvalue_histogram",
    "operator_name",
    "plot",
    "spectrum_figure",
    "summary",
    "symlog",
    "symlog_axis",
    "symlog_edges",
    "symlog_inverse",
    "symlog_linthresh",
]

# The linear part's half width on the axis, in decades (matplotlib's linscale): wide enough
# for the tick label at 0 to stand clear of its neighbours.
LINSCALE = 1.0
_LINEAR_HALF_WIDTH = LINSCALE / (1 - 1 / 10)  # matplotlib's linscale_adj, base 10


def symlog(values: np.ndarray, linthresh: float) -> np.ndarray:
    """λ in the coordinate of matplotlib's symlog axis (base 10, LINSCALE), in decades."""
    values = np.asarray(values, dtype=float)
    magnitude = np.abs(values) / linthresh
    with np.errstate(divide="ignore", invalid="ignore"):  # log10(0): that λ is inside
        outside = np.sign(values) * (_LINEAR_HALF_WIDTH + np.log10(magnitude))
    return np.where(magnitude <= 1, values / linthresh * _LINEAR_HALF_WIDTH, outside)


def symlog_inverse(coordinates: np.ndarray, linthresh: float) -> np.ndarray:
    """The λ at each symlog coordinate (the inverse of `symlog`)."""
    t = np.asarray(coordinates, dtype=float)
    linear = np.abs(t) <= _LINEAR_HALF_WIDTH
    with np.errstate(over="ignore"):
        outside = np.sign(t) * linthresh * 10 ** (np.abs(t) - _LINEAR_HALF_WIDTH)
    return np.where(linear, t / _LINEAR_HALF_WIDTH * linthresh, outside)


def symlog_linthresh(eigenvalues: np.ndarray, tol: np.ndarray | float | None = None) -> float:
    """The power of ten at or below the 1st percentile of the |λ| that are not zero: above
    `tol` (the server's, per point or one for all), else above 0. 1.0 if every λ is 0."""
    values = np.asarray(eigenvalues, dtype=float)
    floor = np.zeros(values.shape[:1]) if tol is None else np.asarray(tol, dtype=float)
    if values.ndim == 2 and floor.ndim == 1:
        floor = floor[:, None]
    magnitudes = np.abs(values)
    nonzero = magnitudes[np.isfinite(magnitudes) & (magnitudes > floor)]
    if not nonzero.size:
        return 1.0
    return float(10.0 ** math.floor(math.log10(np.quantile(nonzero, 0.01))))


def symlog_edges(values: np.ndarray, linthresh: float, bins: int | None = None) -> np.ndarray:
    """Histogram edges of equal width on the symlog axis, one bin centred on 0, covering
    the finite `values`; about `bins` of them (default: √count, between 20 and 120)."""
    t = symlog(values[np.isfinite(values)], linthresh)
    if not t.size:
        t = np.zeros(1)
    if bins is None:
        bins = int(np.clip(math.sqrt(t.size), 20, 120))
    lo, hi = float(t.min()), float(t.max())
    width = max(hi - lo, 2 * _LINEAR_HALF_WIDTH) / bins
    k = np.arange(math.floor(lo / width - 0.5), math.ceil(hi / width + 0.5) + 1)
    return symlog_inverse((k + 0.5) * width, linthresh)


def eigenvalue_histogram(ax: Any, values: np.ndarray, edges: np.ndarray, **style: Any) -> Any:
    """Draw the counts of the finite `values` per bin of `edges` as steps on `ax` (whose
    x axis is then symlog, as `symlog_axis` sets it); what ax.stairs returns."""
    finite = values[np.isfinite(values)]
    counts, _ = np.histogram(finite, bins=edges)
    style.setdefault("fill", True)
    return ax.stairs(counts, edges, **style)


def symlog_axis(ax: Any, which: str, lo: float, hi: float, linthresh: float) -> None:
    """Make the x or y axis (`which`) of `ax` symlog with this linthresh, its limits [lo, hi]
    plus 2% on either side, labels at 0 and at powers of ten at least a decade past the
    linear part (so that no two collide), and an unlabelled tick at every decade."""
    from matplotlib import ticker

    axis = ax.xaxis if which == "x" else ax.yaxis
    set_scale, set_limits = (
        (ax.set_xscale, ax.set_xlim)
        if which == "x"
        else (
            ax.set_yscale,
            ax.set_ylim,
        )
    )
    set_scale("symlog", linthresh=linthresh, linscale=LINSCALE)
    t_lo, t_hi = symlog(np.array([lo, hi]), linthresh)
    margin = 0.02 * max(t_hi - t_lo, 2 * _LINEAR_HALF_WIDTH)
    low, high = symlog_inverse(np.array([t_lo - margin, t_hi + margin]), linthresh)
    set_limits(low, high)
    first = round(math.log10(linthresh))
    last = math.floor(math.log10(max(abs(lo), abs(hi), linthresh)))
    decades = list(range(first, last + 1))
    step = max(1, math.ceil((last - first) / 4))
    labelled = [d for d in decades if d > first and (last - d) % step == 0]
    majors = [0.0] + [s * 10.0**d for d in labelled for s in (-1, 1)]
    minors = [s * 10.0**d for d in decades for s in (-1, 1)]
    axis.set_major_locator(ticker.FixedLocator([v for v in majors if low <= v <= high]))
    axis.set_minor_locator(ticker.FixedLocator([v for v in minors if low <= v <= high]))
    axis.set_major_formatter(ticker.FuncFormatter(_power_of_ten))


def _power_of_ten(value: float, _: object = None) -> str:
    if value == 0:
        return "$0$"
    sign = "-" if value < 0 else ""
    return f"${sign}10^{{{round(math.log10(abs(value)))}}}$"


# The curvature operators (--operator) as the labels name them.
_OPERATOR_NAMES = {
    "hessian": "Hessian",
    "ggn": "GGN",
    "fisher": "Fisher",
    "empirical_fisher": "empirical Fisher",
}


def operator_name(operator: str | None) -> str:
    """The operator as a label names it: "Hessian" for None (a function's own Hessian)."""
    return _OPERATOR_NAMES.get(operator, operator) if operator else "Hessian"


def plot(
    path: Path,
    result: Mapping[str, np.ndarray],
    method: str,
    function_id: str,
    operator: str | None = None,
) -> None:
    """Write `spectrum_figure` as a PNG; Refused if it cannot be written."""
    figure = spectrum_figure(result, method, function_id, operator)
    try:
        figure.canvas.print_png(str(path))
    except OSError as e:
        raise Refused(f"cannot write the plot {path}: {e}") from None


def spectrum_figure(
    result: Mapping[str, np.ndarray],
    method: str,
    function_id: str,
    operator: str | None = None,
) -> Any:
    """The picture of a job's result (a matplotlib Figure on an Agg canvas): for exact and
    lanczos the histogram of every eigenvalue at every point, for density the mean of the
    points' smoothed densities on one grid spanning all of theirs; and the extreme
    eigenvalues per point (for density the extreme Ritz values). `operator` (--operator
    over --data) names the matrix in the labels; None is the Hessian."""
    matrix = operator_name(operator)
    Figure, FigureCanvasAgg = matplotlib()
    from matplotlib import ticker

    num_points = result["gradient_norm"].shape[0]
    figure = Figure(figsize=(10, 3.9), layout="constrained")
    FigureCanvasAgg(figure)
    ax, along = figure.subplots(1, 2, width_ratios=(2.6, 1))
    if method == "density":
        grid, density = result["grid"], result["density"]
        common = np.linspace(np.nanmin(grid), np.nanmax(grid), grid.shape[1])
        mean = np.mean(
            [np.interp(common, g, d, left=0, right=0) for g, d in zip(grid, density, strict=True)],
            axis=0,
        )
        ax.plot(common, mean)
        ax.set_xlim(common[0], common[-1])
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"{matrix} eigenvalue λ")
        ax.set_ylabel("spectral density (SLQ), mean over points")
        nodes = result["nodes"].reshape(num_points, -1)
        lo, hi = np.nanmin(nodes, axis=1), np.nanmax(nodes, axis=1)
        what = "mean spectral density"
    else:
        eigenvalues = np.asarray(result["eigenvalues"], dtype=float)
        linthresh = symlog_linthresh(eigenvalues, result.get("tol"))
        finite = eigenvalues[np.isfinite(eigenvalues)]
        edges = symlog_edges(finite, linthresh)
        ax.axvspan(-linthresh, linthresh, color="0.93", linewidth=0, zorder=0)
        bars = eigenvalue_histogram(ax, finite, edges, color="0.4", linewidth=0)
        data_lo, data_hi = (finite.min(), finite.max()) if finite.size else (-1.0, 1.0)
        symlog_axis(ax, "x", data_lo, data_hi, linthresh)
        _log_axis(ax, "y", 1.0, max(1.0, float(bars.get_data().values.max(initial=1))))
        ax.set_ylim(bottom=0.7)
        ax.set_xlabel(f"{matrix} eigenvalue λ (symlog axis, linear within ±{_plain(linthresh)})")
        ax.set_ylabel("eigenvalues per bin\n(bins of equal width on this axis)")
        lo, hi = np.nanmin(eigenvalues, axis=1), np.nanmax(eigenvalues, axis=1)
        count = eigenvalues.shape[1]
        what = f"{'all' if method == 'exact' else 'the extreme'} {count} eigenvalues"
    of = "" if operator is None else f" of the {matrix}"
    figure.suptitle(
        f"{method}: {what}{of} at each of {num_points} points · function {function_id[:12]}",
        fontsize="medium",
    )
    _draw_extremes(along, lo, hi)
    along.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6, integer=True))
    along.set_xlabel("point (row of --points)")
    return figure


def _draw_extremes(ax: Any, lo: np.ndarray, hi: np.ndarray) -> None:
    """λmax and λmin per point. Where each keeps one sign (all saddles, all minima, all
    maxima), their magnitudes on a log axis, which spends no height on decades between
    them; else both on a symlog axis around a zero line. The legend sits above the axes."""
    index = np.arange(len(lo))
    marker = "o" if len(lo) <= 40 else ""
    series = [(hi, "λmax", "C3"), (lo, "λmin", "C0")]
    signs = [_sign(values) for values, _, _ in series]
    if all(signs):
        for (values, name, color), sign in zip(series, signs, strict=True):
            label = name if sign > 0 else f"\N{MINUS SIGN}{name}"
            ax.plot(index, sign * values, f"{marker}-", color=color, label=label)
        magnitudes = np.abs(np.concatenate([lo, hi]))
        magnitudes = magnitudes[np.isfinite(magnitudes)]
        _log_axis(ax, "y", float(magnitudes.min()), float(magnitudes.max()))
        ax.set_ylabel("|extreme eigenvalue|")
    else:
        for values, name, color in series:
            ax.plot(index, values, f"{marker}-", color=color, label=name)
        ax.axhline(0.0, color="gray", linewidth=0.8, zorder=0)
        both = np.concatenate([lo, hi])
        finite = both[np.isfinite(both)]
        if finite.size:
            nonzero = np.abs(finite[finite != 0])
            linthresh = 10.0 ** math.floor(math.log10(nonzero.min())) if nonzero.size else 1.0
            symlog_axis(ax, "y", float(finite.min()), float(finite.max()), linthresh)
        ax.set_ylabel("extreme eigenvalue")
    ax.legend(
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncols=2,
        frameon=False,
        borderaxespad=0.2,
        handlelength=1.5,
    )


def _log_axis(ax: Any, which: str, lo: float, hi: float) -> None:
    """A log axis labelled at powers of ten, or at 1, 2 and 5 times them where the values
    span less than a decade and a half: never matplotlib's labels of minor ticks (6e-1)."""
    from matplotlib import ticker

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    if hi < 30 * lo:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _sign(values: np.ndarray) -> int:
    """1 if every finite value is positive, -1 if every one is negative, else 0."""
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all():
        return 1
    if finite.size and (finite < 0).all():
        return -1
    return 0


def _plain(value: float) -> str:
    """1e-04 → "10⁻⁴", 1 → "1"."""
    exponent = round(math.log10(value))
    if exponent == 0:
        return "1"
    superscript = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    return "10" + str(exponent).translate(superscript)


def summary(
    result: Mapping[str, np.ndarray],
    method: str,
    function_id: str,
    wall: float,
    computed: int,
    resumed: int,
    operator: str | None = None,
) -> str:
    """One line per class: count, fraction, how many stationary; the total; the timing.
    Over data (`operator` given), the classes are of that operator's spectrum."""
    point_class, stationary = result["point_class"], result["stationary"]
    total = point_class.shape[0]
    lines = [f"{'class':<12}{'count':>8}{'fraction':>10}{'stationary':>12}"]
    for name in (c.value for c in PointClass):
        members = point_class == name
        count = int(members.sum())
        lines.append(
            f"{name:<12}{count:>8}{count / total:>10.3f}{int(stationary[members].sum()):>12}"
        )
    lines.append(f"{'total':<12}{total:>8}{1:>10.3f}{int(stationary.sum()):>12}")
    of = "" if operator is None else f" of the {operator_name(operator)}"
    timing = f"{method}{of}, function {function_id[:12]}: {wall:.2f} s wall, "
    timing += f"{computed / wall:.1f} points/s"
    if resumed:
        timing += f" ({computed} computed now, {resumed} resumed from an earlier run)"
    lines.append(timing)
    if method == "density":
        lines.append("classes of density from the extreme Ritz values of the SLQ runs")
    return "\n".join(lines)
