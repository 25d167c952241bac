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
from .claims import series_label

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


def plot_frontier(rows: list[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Reward (y, ± SE) against sequence-level KL (x, ± SE): one line per method (and pairs variant).

    Points of a method are joined in order of KL and labelled with their β; the base
    model is a star at its KL (0 when ``kl_mean`` is None). Up and to the left is better.
    The error bars are the rows' ``reward_se`` and ``kl_se``: over seeds for seed means.
    """
    rows = _check_rows(rows)
    fig = _new_figure((7.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    methods: dict[str, list[dict]] = {}
    for row in rows:
        if row["reward_mean"] is None:
            raise ValueError(f"result row {row['method']} beta={row['beta']}: reward_mean is None")
        if row["method"] != "base" and row["kl_mean"] is None:
            raise ValueError(f"result row {row['method']} beta={row['beta']}: kl_mean is None")
        methods.setdefault(series_label(str(row["method"]), row.get("pairs")), []).append(row)

    for method, group in methods.items():
        if method == "base":
            continue
        group = sorted(group, key=lambda r: r["kl_mean"])
        xs = [r["kl_mean"] for r in group]
        ys = [r["reward_mean"] for r in group]
        ax.errorbar(
            xs,
            ys,
            xerr=[_num(r["kl_se"]) for r in group],
            yerr=[_num(r["reward_se"]) for r in group],
            marker="o",
            markersize=5,
            linewidth=1.5,
            capsize=3,
            label=method,
        )
        for r, x, y in zip(group, xs, ys):
            if r["beta"] is not None:
                ax.annotate(f"β={r['beta']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)

    for r in methods.get("base", []):
        ax.errorbar(
            [_num(r["kl_mean"])],
            [r["reward_mean"]],
            yerr=[_num(r["reward_se"])],
            marker="*",
            markersize=14,
            color="black",
            linestyle="none",
            capsize=3,
            label="base",
        )

    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel(REWARD_LABEL)
    ax.set_title(title or "Reward vs KL frontier (up and left is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)


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
    "plot_frontier",
    "plot_training_curves",
    "write_report_md",
    "write_results",
]
