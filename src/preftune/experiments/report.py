"""Results of the controlled experiment: tables, the reward-vs-KL frontier, training curves.

One *result row* per evaluated model::

    {"method": "dpo", "beta": 0.1, "reward_mean": 1.42, "reward_se": 0.02,
     "kl_mean": 3.1, "kl_se": 0.2, "win_rate": 0.71, "logp_agreement": 0.52,
     "n_samples": 340, ...optional extra keys}

The base model has ``method="base"`` and ``beta=None``. Any value except ``method`` and
``n_samples`` may be ``None`` (shown as "-"). Plots use matplotlib's object API with the
Agg canvas, so importing this module never changes the global pyplot backend.

The experiment adds ``run`` (the run's name without its seed), ``seed``, ``pairs`` (a methods entry's own
pairs setting, e.g. ``all-n48``; None on the experiment's pairs), ``pairs_mode``, ``n_pairs``,
``win_rate_se`` and ``logp_agreement_se``. With several seeds, :func:`aggregate_seeds` turns the per-seed
rows into one row per run whose ``*_se`` are standard errors over seeds; a method's points on a pairs
variant are their own series in the table and the plot (``dpo [all-n48]``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .. import metrics as M
from ..files import read_jsonl, write_bytes_atomic, write_json_atomic, write_text_atomic
from .claims import interpolation_weights, series_label

RESULT_KEYS = (
    "method",
    "beta",
    "reward_mean",
    "reward_se",
    "kl_mean",
    "kl_se",
    "win_rate",
    "logp_agreement",
    "n_samples",
)
KL_LABEL = "KL(π_θ‖π_ref) (nats, sequence-level)"
REWARD_LABEL = "mean reward (1 + VADER compound)"
CURVE_KEYS = ("loss", "rewards/margins", "rewards/accuracies")
# (mean, standard error) columns that aggregate_seeds averages over seeds
SEED_AVERAGED = (
    ("reward_mean", "reward_se"),
    ("kl_mean", "kl_se"),
    ("win_rate", "win_rate_se"),
    ("logp_agreement", "logp_agreement_se"),
)


def _clean(value):
    """Non-finite floats become None so that JSON stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_rows(rows: list[dict]) -> list[dict]:
    if not rows:
        raise ValueError("no result rows")
    for i, row in enumerate(rows):
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row {i} ({row.get('method', '?')}) is missing keys {missing}")
    return [{k: _clean(v) for k, v in row.items()} for row in rows]


def _columns(rows: list[dict]) -> list[str]:
    extra: list[str] = []
    for row in rows:
        extra.extend(k for k in row if k not in RESULT_KEYS and k not in extra)
    return list(RESULT_KEYS) + extra


def aggregate_seeds(rows: list[dict]) -> list[dict]:
    """One row per run from per-seed rows: the mean over seeds and its standard error over seeds.

    Rows are grouped by ``run`` (by method and beta where a row has none), in order of first appearance.
    For each pair of :data:`SEED_AVERAGED`, the mean column becomes the mean of the seeds' means and the
    SE column the sample std of those means / √n_seeds (:func:`preftune.metrics.mean_and_se`): the spread
    over seeds holds both the training and the evaluation noise, so the per-seed SEs are not reused (None
    where any seed has None). ``n_samples`` is summed, ``n_seeds`` added, ``seed`` dropped; other keys are
    the first seed's. Example: rewards 1.2, 1.4, 1.3 -> reward_mean 1.3, reward_se 0.1/√3 = 0.0577.
    """
    groups: dict = {}
    for row in _check_rows(rows):
        groups.setdefault(row.get("run") or (row["method"], row["beta"]), []).append(row)
    out = []
    for group in groups.values():
        row = {k: v for k, v in group[0].items() if k != "seed"}
        for mean_key, se_key in SEED_AVERAGED:
            values = [r.get(mean_key) for r in group]
            row[mean_key], row[se_key] = (None, None) if None in values else M.mean_and_se(values)
        row["n_samples"] = sum(r["n_samples"] for r in group)
        row["n_seeds"] = len(group)
        out.append(row)
    return out


def write_results(out_dir: str | Path, rows: list[dict], name: str = "results") -> tuple[Path, Path]:
    """Write ``<name>.csv`` and ``<name>.json`` (a list of rows) into ``out_dir`` atomically.

    Columns: :data:`RESULT_KEYS` in order, then extra keys in order of first appearance;
    ``None`` is an empty CSV cell. Returns ``(csv_path, json_path)``.
    """
    rows = _check_rows(rows)
    out_dir = Path(out_dir)
    columns = _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    csv_path = write_text_atomic(out_dir / f"{name}.csv", buf.getvalue())
    json_path = write_json_atomic(out_dir / f"{name}.json", rows)
    return csv_path, json_path


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())


def _num(value) -> float:
    return 0.0 if value is None else float(value)


MARKERS = "osD^v<>ph*"  # one per pairs setting, in order of first appearance (lines: solid, then dashed)


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by series (method and pairs setting), each sorted by KL; base rows under ``base``."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["reward_mean"] is None:
            raise ValueError(f"result row {row['method']} beta={row['beta']}: reward_mean is None")
        if row["method"] != "base" and row["kl_mean"] is None:
            raise ValueError(f"result row {row['method']} beta={row['beta']}: kl_mean is None")
        series.setdefault(series_label(str(row["method"]), row.get("pairs")), []).append(row)
    return {k: v if k == "base" else sorted(v, key=lambda r: r["kl_mean"]) for k, v in series.items()}


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _segment_boxes(polyline, step: float = 3.0, half: float = 1.5) -> list[tuple[float, float, float, float]]:
    """Small boxes every ``step`` display pixels along a polyline (display coordinates): a line as obstacles."""
    boxes = []
    for (x0, y0), (x1, y1) in zip(polyline, polyline[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        for i in range(n + 1):
            x, y = x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n
            boxes.append((x - half, y - half, x + half, y + half))
    return boxes


def place_labels(ax, labels: list[tuple[float, float, str, str]], lines=(), *, fontsize: float = 7.5) -> list:
    """Annotate each point (x, y, text, colour) with its label where it overlaps no other label, no point and
    no line of ``lines`` (polylines in data coordinates, e.g. the series and their error bars) and stays
    inside the axes: candidates on rings of growing radius around the point, the first free one taken
    (greedy, in order); where no place misses the lines, the first that misses labels and points. A label
    set away from its point gets a thin leader line; each has a light background. The axes' limits are fixed
    first (labels must not move them). Returns the annotations."""
    import numpy as np

    fig = ax.figure
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    points = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in labels]
    hard = [(px - 4, py - 4, px + 4, py + 4) for px, py in points]  # markers, then the labels placed
    soft = [b for line in lines for b in _segment_boxes([tuple(ax.transData.transform(p)) for p in line])]
    soft_arr = np.array(soft, dtype=float).reshape(-1, 4)
    scale = fig.dpi / 72.0  # points -> display pixels

    def free(cand, obstacles) -> bool:
        o = np.asarray(obstacles, dtype=float).reshape(-1, 4)
        return not np.any(
            (cand[0] < o[:, 2]) & (o[:, 0] < cand[2]) & (cand[1] < o[:, 3]) & (o[:, 1] < cand[3])
        )

    out = []
    for (x, y, text, color), (px, py) in zip(labels, points):
        probe = fig.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        w, h = extent.width, extent.height
        probe.remove()
        candidates = []
        for radius in (4, 8, 13, 19, 26, 35, 46, 60):
            for k in range(16):
                angle = math.pi / 4 + k * math.pi / 8  # up-right first, then round the circle
                c, si = math.cos(angle), math.sin(angle)
                cx, cy = px + radius * scale * c, py + radius * scale * si
                x0 = cx if c > 0.2 else cx - w if c < -0.2 else cx - w / 2
                y0 = cy if si > 0.2 else cy - h if si < -0.2 else cy - h / 2
                cand = (x0 - 1, y0 - 1, x0 + w + 1, y0 + h + 1)
                if box.x0 <= cand[0] and box.y0 <= cand[1] and cand[2] <= box.x1 and cand[3] <= box.y1:
                    candidates.append((radius, cand))
        chosen = next((rc for rc in candidates if free(rc[1], hard) and free(rc[1], soft_arr)), None)
        chosen = chosen or next((rc for rc in candidates if free(rc[1], hard)), None)
        if chosen is None:  # nowhere free: up and right of the point, overlapping
            chosen = (4, (px + 4 * scale, py + 4 * scale, px + 4 * scale + w, py + 4 * scale + h))
        radius, cand = chosen
        hard.append(cand)
        offset = ((cand[0] + 1 - px) / scale, (cand[1] + 1 - py) / scale)  # points: immune to a tight crop
        arrow = {"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.8} if radius > 8 else None
        out.append(
            ax.annotate(
                text,
                (x, y),
                xytext=offset,
                textcoords="offset points",
                ha="left",
                va="bottom",
                fontsize=fontsize,
                color=color,
                arrowprops=arrow,
                bbox={
                    "boxstyle": "square,pad=0.05",
                    "facecolor": "white",
                    "edgecolor": "none",
                    "alpha": 0.75,
                },
            )
        )
    return out


def plot_frontier(rows: list[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Reward (y, ± SE) against sequence-level KL (x, ± SE, log scale): one line per method and pairs setting.

    Points of a series are joined in order of KL and labelled with their β in the series' colour, each label
    where it collides with no other (:func:`place_labels`); a pairs variant has its own marker and a dashed
    line. KL is drawn on a log axis, so that points crowded at small KL spread out; the base model (KL 0) is
    a horizontal line with its ± SE band. Up and to the left is better. The error bars are the rows'
    ``reward_se`` and ``kl_se``: over seeds for seed means.
    """
    rows = _check_rows(rows)
    series = _series(rows)
    fig = _new_figure((9.0, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)] + ["#555555", "#8c6d31", "#393b79", "#637939"]
    pairs_order: list = []
    labels, lines = [], []
    positive = [r["kl_mean"] for r in rows if r["method"] != "base" and r["kl_mean"] > 0]
    floor = min(positive) / 2 if positive else 1e-3  # where a KL ≤ 0 (noise) is drawn on the log axis
    for i, (name, group) in enumerate(s for s in series.items() if s[0] != "base"):
        pairs = group[0].get("pairs")
        if pairs not in pairs_order:
            pairs_order.append(pairs)
        style = pairs_order.index(pairs)
        colour = colours[i % len(colours)]
        xs = [max(r["kl_mean"], floor) for r in group]  # a log axis: a KL ≤ 0 (noise) sits at the floor
        ys = [r["reward_mean"] for r in group]
        ax.errorbar(
            xs,
            ys,
            xerr=[_num(r["kl_se"]) for r in group],
            yerr=[_num(r["reward_se"]) for r in group],
            marker=MARKERS[style % len(MARKERS)],
            markersize=5,
            linewidth=1.4,
            linestyle="-" if style == 0 else "--",
            capsize=2.5,
            elinewidth=0.8,
            color=colour,
            label=name,
        )
        labels += [
            (x, y, f"β={r['beta']:g}", colour) for r, x, y in zip(group, xs, ys) if r["beta"] is not None
        ]
        lines.append(list(zip(xs, ys)))
        for r, x, y in zip(group, xs, ys):  # the error bars
            dx, dy = _num(r["kl_se"]), _num(r["reward_se"])
            lines += [[(max(x - dx, floor), y), (x + dx, y)], [(x, y - dy), (x, y + dy)]]
    for r in series.get("base", []):
        y, se = r["reward_mean"], _num(r["reward_se"])
        ax.axhline(y, color="black", linestyle=":", linewidth=1.2, label="base (KL 0)")
        if se:
            ax.axhspan(y - se, y + se, color="black", alpha=0.08, linewidth=0)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_kl_formatter())
    ax.xaxis.set_minor_formatter(_kl_formatter(minor=True))
    ax.set_xlabel(KL_LABEL + ", log scale")
    ax.set_ylabel(REWARD_LABEL)
    ax.set_title(title or "Reward vs KL frontier (up and left is better)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.margins(x=0.08, y=0.08)
    place_labels(ax, labels, lines)
    return _save_png(fig, path)


def _kl_formatter(minor: bool = False):
    """Tick labels for a log KL axis: plain numbers (0.5, 1, 2, 5), minor ticks only at 2 and 5 × 10^k."""
    from matplotlib.ticker import FuncFormatter

    def fmt(value, _pos):
        mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        if minor and round(mantissa) not in (2, 5):
            return ""
        return f"{value:g}"

    return FuncFormatter(fmt)


VERDICT_COLOURS = {"held": "#2a7d2a", "not held": "#b22222", "not separable": "#666666"}


def _claim_numbers(c: dict) -> str:
    if c.get("difference") is None:
        return "no difference computable"
    text = f"d = {c['difference']:+.3f} ± {_fmt(c.get('se'))}"
    if c.get("df") is not None:
        text += f", t*({c['df']}) = {c['critical']:.2f}"
    return text


def plot_claim(claim: dict, path: str | Path) -> Path:
    """A frontier claim's own small panel (a claims.json record with a ``panel``): the two frontiers it compares
    (means ± SE), the KL range they are compared over shaded and their interpolation drawn thick over it (or
    the two nearest points joined), and d ± SE with its verdict in the title."""
    panel = claim["panel"]
    fig = _new_figure((4.4, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for side, colour in (("a", "C0"), ("b", "C3")):
        pts = sorted(panel[side]["points"], key=lambda p: p["kl_mean"])
        xs, ys = [p["kl_mean"] for p in pts], [p["reward_mean"] for p in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[_num(p["kl_se"]) for p in pts],
            yerr=[_num(p["reward_se"]) for p in pts],
            marker="o",
            markersize=4,
            linewidth=1.0,
            capsize=2,
            elinewidth=0.7,
            color=colour,
            alpha=0.85,
            label=panel[side]["label"],
        )
        for p in pts:
            if p["beta"] is not None:
                ax.annotate(f"β={p['beta']:g}", (p["kl_mean"], p["reward_mean"]), xytext=(3, -9),
                            textcoords="offset points", fontsize=6.5, color=colour)  # fmt: skip
        if "overlap" in panel:
            lo, hi = panel["overlap"]
            grid = [lo] if lo == hi else [lo + (hi - lo) * i / 50 for i in range(51)]
            curve = [sum(w * y for w, y in zip(interpolation_weights(xs, x), ys)) for x in grid]
            ax.plot(grid, curve, color=colour, linewidth=3.5, alpha=0.45, marker="s" if lo == hi else None)
    if "overlap" in panel:
        lo, hi = panel["overlap"]
        if lo == hi:
            ax.axvline(lo, color="black", linewidth=0.8, linestyle=":")
        else:
            ax.axvspan(lo, hi, color="gold", alpha=0.2, linewidth=0, label="compared over")
    elif "nearest" in panel:
        (xa, ya), (xb, yb) = panel["nearest"]
        style = ":" if claim.get("basis") == "apart" else "-"
        ax.plot([xa, xb], [ya, yb], color="black", linewidth=1.0, linestyle=style, label="points compared")
    ax.set_title(
        f"({claim['claim']}) {claim['scope']}: {claim['verdict']}\n{_claim_numbers(claim)}",
        fontsize=8,
        color=VERDICT_COLOURS.get(claim["verdict"], "black"),
    )
    ax.set_xlabel("KL (nats)", fontsize=7)
    ax.set_ylabel("reward", fontsize=7)
    ax.tick_params(labelsize=6.5)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    return _save_png(fig, path)


def plot_claims_forest(claims: list[dict], path: str | Path, *, title: str) -> Path:
    """Claims without frontiers, one row each: the per-unit paired differences (dots), d (diamond) and
    d ± t*·se (the bar the verdict reads: clear of 0 on the claimed side is held), coloured by verdict."""
    fig = _new_figure((6.4, 0.9 + 0.32 * len(claims)))
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(claims):
        y = len(claims) - 1 - i
        colour = VERDICT_COLOURS.get(c["verdict"], "black")
        values = [v for _, v in c.get("per_unit") or []]
        if values and len(values) <= 50:  # per seed: every value; per prompt: too many to show
            ax.plot(values, [y] * len(values), "o", color="0.6", markersize=3, zorder=1)
        d, se, crit = c.get("difference"), c.get("se"), c.get("critical")
        if d is None:
            continue
        if se is not None and crit is not None:
            ax.plot([d - crit * se, d + crit * se], [y, y], color=colour, linewidth=2.2, zorder=2)
        ax.plot([d], [y], "D", color=colour, markersize=5, zorder=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(claims)))
    ax.set_yticklabels([f"{c['scope']}: {c['verdict']}" for c in reversed(claims)], fontsize=7)
    ax.set_ylim(-0.7, len(claims) - 0.3)
    ax.tick_params(axis="x", labelsize=7)
    unit = claims[0].get("unit") if claims else None
    dots = "per seed" if unit == "seed" else f"per {unit}, shown up to 50"
    ax.set_xlabel(f"paired difference d (dots: {dots}; bar: d ± t*·se)", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.grid(True, axis="x", alpha=0.25)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_claims(out_dir: str | Path, claims: list[dict], folder: str = "claims") -> dict[int, str]:
    """Every claim's panel under ``out_dir/folder``: one per frontier claim (:func:`plot_claim`), one forest
    per claim letter for the others (:func:`plot_claims_forest`). Returns ``{claim index: path relative to
    out_dir}`` for :func:`preftune.experiments.claims.claims_markdown`."""
    out_dir = Path(out_dir)
    for old in (out_dir / folder).glob("*.png"):  # an earlier report's panels: its claims may differ
        old.unlink()
    figures: dict[int, str] = {}
    grouped: dict[tuple, list[int]] = {}
    for i, c in enumerate(claims):
        if c.get("panel"):
            name = f"{folder}/{i:02d}-{c['claim']}.png"
            plot_claim(c, out_dir / name)
            figures[i] = name
        else:
            grouped.setdefault((c["claim"], c["statement"]), []).append(i)
    for (letter, statement), indices in grouped.items():
        name = f"{folder}/{indices[0]:02d}-{letter}-all.png"
        plot_claims_forest([claims[i] for i in indices], out_dir / name, title=f"({letter}) {statement}")
        figures.update({i: name for i in indices})
    return figures


def plot_training_curves(
    metrics_files: dict[str, Path], path: str | Path, *, keys: tuple[str, ...] = CURVE_KEYS
) -> Path:
    """One subplot per metric key (default loss, rewards/margins, rewards/accuracies).

    ``metrics_files`` maps a run label to a JSONL file of dicts with ``"step"`` and the
    metric keys; rows with ``"split"`` other than ``"train"`` are ignored (rows without a
    split count as train). One line per run label; a run lacking a key is left out of
    that subplot.
    """
    if not metrics_files:
        raise ValueError("plot_training_curves: no metrics files")
    fig = _new_figure((4.2 * len(keys), 3.6))
    axes = [fig.add_subplot(1, len(keys), i + 1) for i in range(len(keys))]
    for label, file in metrics_files.items():
        if not Path(file).is_file():
            raise FileNotFoundError(f"metrics file for run {label!r} not found: {file}")
        rows = [r for r in read_jsonl(file) if r.get("split", "train") == "train" and "step" in r]
        for ax, key in zip(axes, keys):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2, label=label)
    for ax, key in zip(axes, keys):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save_png(fig, path)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(mean, se, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {_fmt(se, digits)}"


def _table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "beta", "reward ± se", "KL ± se", "win rate", "logp agree", "n"]
    body = [
        [
            series_label(str(r["method"]), r.get("pairs")),
            "-" if r["beta"] is None else f"{r['beta']:g}",
            _pm(r["reward_mean"], r["reward_se"]),
            _pm(r["kl_mean"], r["kl_se"]),
            _fmt(r["win_rate"]),
            _fmt(r["logp_agreement"]),
            _fmt(r["n_samples"]),
        ]
        for r in rows
    ]
    return header, body


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table for the terminal (one line per row)."""
    header, body = _table_cells(_check_rows(rows))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report_md(
    out_dir: str | Path,
    rows: list[dict],
    config_summary: dict,
    images: list[str],
    *,
    sections: dict[str, str] | None = None,
) -> Path:
    """Write ``out_dir/report.md``: configuration, results table, extra ``sections`` (title -> markdown,
    e.g. the claims), linked images.

    ``images``: relative paths are linked as given (relative to ``out_dir``); absolute
    paths inside ``out_dir`` are made relative to it, others are linked as they are.
    """
    out_dir = Path(out_dir)
    header, body = _table_cells(_check_rows(rows))
    lines = ["# preftune controlled sentiment experiment", "", "## Configuration", ""]
    for key, value in config_summary.items():
        shown = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
        lines.append(f"- **{key}**: {shown}")
    lines += ["", "## Results", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
    lines += [
        "",
        "Reward: mean over held-out samples ± standard error. KL: mean over the same samples of",
        "log π_θ(y|x) − log π_ref(y|x) ± standard error. Win rate: against the base model's",
        "sample for the same prompt and slot (ties count half).",
    ]
    for title, text in (sections or {}).items():
        lines += ["", f"## {title}", "", text]
    if images:
        lines += ["", "## Figures", ""]
        for image in images:
            link = Path(image)
            if link.is_absolute():
                try:
                    link = link.relative_to(out_dir.resolve())
                except ValueError:
                    pass
            lines.append(f"![{link.stem}]({link.as_posix()})")
            lines.append("")
    return write_text_atomic(out_dir / "report.md", "\n".join(lines).rstrip() + "\n")


__all__ = [
    "CURVE_KEYS",
    "KL_LABEL",
    "RESULT_KEYS",
    "REWARD_LABEL",
    "SEED_AVERAGED",
    "aggregate_seeds",
    "format_table",
    "place_labels",
    "plot_claim",
    "plot_claims",
    "plot_claims_forest",
    "plot_frontier",
    "plot_training_curves",
    "write_report_md",
    "write_results",
]
