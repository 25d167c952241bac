"""Choosing each run's setting on the validation prompts (the experiment's ``tune`` section).

Every candidate setting of a run (a learning rate; for SimPO also a γ/β ratio) is trained and evaluated on
the validation prompts exactly as models are evaluated on the held-out ones. Per run (a *group* of
candidates) the chosen candidate is the one with the highest validation reward among those whose validation
KL is at most ``max_kl`` (the first listed on a tie); when no candidate is within the bound, the one with the
lowest KL. Only the chosen candidates are then evaluated on the held-out prompts, once, so the held-out
numbers are not the best of several tries. The rule reads the point estimates (seed means with several seeds),
not their standard errors.
"""

from __future__ import annotations

RULE = (
    "per run: the candidate with the highest validation reward among those with validation KL <= max_kl "
    "(the first listed on a tie); if none is within the bound, the one with the lowest validation KL"
)


def choose(rows: list[dict], max_kl: float) -> int:
    """Index of the chosen candidate among one run's validation rows (each with ``reward_mean`` and
    ``kl_mean``), by :data:`RULE`.

    Example: rewards 1.30, 1.40, 1.50 at KL 0.5, 1.5, 2.5 with ``max_kl`` 2 -> 1 (1.50 is out of bounds);
    with ``max_kl`` 0.4 -> 0 (none within: the lowest KL).
    """
    if not rows:
        raise ValueError("no candidates to choose from")
    within = [i for i, r in enumerate(rows) if r["kl_mean"] <= max_kl]
    if within:
        return max(within, key=lambda i: (rows[i]["reward_mean"], -i))
    return min(range(len(rows)), key=lambda i: (rows[i]["kl_mean"], i))


def mark_chosen(rows: list[dict]) -> list[dict]:
    """The validation rows of every candidate (each with ``group`` and ``max_kl``), in order, each with
    ``within_kl`` and ``chosen`` added: one chosen per group (:func:`choose`)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["group"], []).append(i)
    out = [{**r, "within_kl": r["kl_mean"] <= r["max_kl"], "chosen": False} for r in rows]
    for members in groups.values():
        picked = choose([rows[i] for i in members], rows[members[0]]["max_kl"])
        out[members[picked]]["chosen"] = True
    return out


def tuning_markdown(rows: list[dict]) -> str:
    """The report's Tuning section: every candidate's validation numbers, the chosen ones in bold."""
    lines = [
        f"Settings chosen on the validation prompts; {RULE}. Held-out numbers above are the chosen "
        "candidates' only.",
        "",
        "| run | learning rate | γ | validation reward ± se | validation KL ± se | max KL | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gamma = "-" if r.get("gamma") is None else f"{r['gamma']:g}"
        cells = [
            r["group"],
            f"{r['learning_rate']:g}",
            gamma,
            f"{r['reward_mean']:.3f} ± {r['reward_se']:.3f}",
            f"{r['kl_mean']:.2f} ± {r['kl_se']:.2f}",
            f"{r['max_kl']:g}",
            "**yes**" if r["chosen"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
