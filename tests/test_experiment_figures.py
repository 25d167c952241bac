"""The experiment's figures: frontier labels that do not collide, one panel per claim, and report.md's Claims
section linking them."""

from __future__ import annotations

import json

from matplotlib.text import Text

from preftune.experiments.claims import claims_markdown, evaluate_claims, seed_replicates
from preftune.experiments.report import (
    _new_figure,
    aggregate_seeds,
    place_labels,
    plot_claims,
    plot_frontier,
    write_report_md,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# the paper run's seed means (docs/experiments.md): ten series, eight of them within KL 0.6–1.4
PAPER = [
    ("base", None, None, 1.129, 0.015, 0.0, 0.0),
    ("dpo", None, 0.5, 1.224, 0.021, 0.92, 0.10),
    ("dpo", None, 0.1, 1.246, 0.023, 1.26, 0.14),
    ("odpo", None, 0.1, 1.257, 0.007, 1.26, 0.13),
    ("ipo", None, 0.1, 1.230, 0.011, 1.07, 0.05),
    ("simpo", None, 2.0, 1.147, 0.011, 0.92, 0.11),
    ("grpo", None, 0.0, 1.290, 0.025, 1.34, 0.21),
    ("ppo", None, 0.1, 1.170, 0.027, 0.62, 0.04),
    ("ppo", None, 0.01, 1.200, 0.004, 0.91, 0.08),
    ("dpo", "all", 0.1, 1.341, 0.057, 4.88, 0.29),
    ("odpo", "all", 0.1, 1.419, 0.024, 5.49, 0.64),
    ("dpo", "all-n48", 0.1, 1.188, 0.007, 0.84, 0.14),
    ("odpo", "all-n48", 0.1, 1.216, 0.015, 0.88, 0.05),
]


def paper_rows():
    return [
        {
            "method": m,
            "beta": beta,
            "reward_mean": r,
            "reward_se": rse,
            "kl_mean": kl,
            "kl_se": klse,
            "win_rate": None,
            "logp_agreement": None,
            "n_samples": 576,
            "pairs": pairs,
            "run": "base" if m == "base" else f"{m}-{pairs}-{beta}",
        }
        for m, pairs, beta, r, rse, kl, klse in PAPER
    ]


def _boxes(fig, annotations):
    """The labels' text boxes (an Annotation's own extent includes its leader line)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(a, renderer) for a in annotations]


def test_labels_collide_with_no_label_and_no_point():
    """Twelve labels on points packed closer than a label's width: each label clear of every other label and
    of every point, inside the axes (a fixed offset, as the frontier used to draw them, overlaps)."""
    fig = _new_figure((7.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    points = [(0.84 + 0.02 * i, 1.20 + 0.004 * (i % 4)) for i in range(12)]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    ax.set_xlim(0.5, 1.5)
    ax.set_ylim(1.1, 1.3)
    labels = [(x, y, f"β={0.1 * (i + 1):g}", f"C{i % 10}") for i, (x, y) in enumerate(points)]
    boxes = _boxes(fig, place_labels(ax, labels))
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    for i, a in enumerate(boxes):
        assert a.x0 >= frame.x0 - 1 and a.x1 <= frame.x1 + 1 and a.y0 >= frame.y0 - 1 and a.y1 <= frame.y1 + 1
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), f"label {i} overlaps a later one"
        for x, y in points:
            px, py = ax.transData.transform((x, y))
            assert not (a.x0 < px < a.x1 and a.y0 < py < a.y1), f"label {i} covers a point"
    fixed = [ax.annotate(t, (x, y), xytext=(4, 4), textcoords="offset points") for x, y, t, _ in labels]
    fixed_boxes = _boxes(fig, fixed)
    assert any(a.overlaps(b) for i, a in enumerate(fixed_boxes) for b in fixed_boxes[i + 1 :])


def test_labels_avoid_lines_when_they_can():
    fig = _new_figure((5.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    line = [(5.0, 0.0), (5.0, 10.0)]  # a vertical line through the point: the label must sit beside it
    (annotation,) = place_labels(ax, [(5.0, 5.0, "β=0.1", "C0")], [line])
    (box,) = _boxes(fig, [annotation])
    px, _ = ax.transData.transform((5.0, 5.0))
    assert box.x0 > px or box.x1 < px


def test_frontier_of_the_paper_run_and_claim_panels(tmp_path):
    rows = paper_rows()
    assert plot_frontier(rows, tmp_path / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    rows = rows[:3] + rows[7:9]  # base, DPO and PPO at two β each: claims (a), (c) x 4, (d) x 2
    by_seed = [
        {**r, "seed": s, "reward_mean": r["reward_mean"] + 0.01 * (s - 1) * (i % 3 - 1)}
        for s in range(3)
        for i, r in enumerate(rows)
    ]
    claims = evaluate_claims(aggregate_seeds(by_seed), seed_replicates(by_seed))
    figures = plot_claims(tmp_path, claims)
    frontier_claims = [i for i, c in enumerate(claims) if c.get("panel")]
    assert frontier_claims and all(
        figures[i] == f"claims/{i:02d}-{claims[i]['claim']}.png" for i in frontier_claims
    )
    shared = {figures[i] for i, c in enumerate(claims) if c["claim"] == "c"}
    assert len(shared) == 1  # the (c) claims share one forest, a row each
    for name in set(figures.values()):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "claims" / "99-stale.png").write_bytes(PNG_MAGIC)
    plot_claims(tmp_path, claims)
    assert not (tmp_path / "claims" / "99-stale.png").exists()  # an earlier report's panel goes
    md = write_report_md(tmp_path, rows, {}, [], sections={"Claims": claims_markdown(claims, figures)})
    text = md.read_text()
    for name in set(figures.values()):
        assert text.count(f"]({name})") == 1
    json.dumps(claims)  # claims.json: every record serialisable
