"""KTO: the loss by hand and against TRL's formula, the reference point from mismatched pairs of the batch,
the unpaired data path (errors with file and line, pairs -> records), and training on the tiny model."""

from __future__ import annotations

import copy
import inspect
import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_training import make_cfg, metrics, pair_records, quiet, weights, write_jsonl

import preftune
from preftune.config import ConfigError, load_config
from preftune.data import DataError, load_rows, pairs_to_unpaired, tokenize_rows
from preftune.losses import kto_loss, kto_reference_point
from preftune.models import load_model
from preftune.training.kto import KTOFamily, kl_pairs
from preftune.training.prepare import prepare
from preftune.training.reference import build_reference

ROOT = Path(__file__).resolve().parents[1]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def unpaired_records(n: int) -> list[dict]:
    good = ["great and wonderful", "a wonderful story", "I loved it"]
    bad = ["terrible and boring", "a waste of time", "far too long"]
    return [
        {
            "prompt": f"Review {i}: the movie was",
            "completion": f" {(good if i % 2 == 0 else bad)[i % 3]}.",
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


def kto_cfg(model_dir, train_file, out_dir, **extra):
    return make_cfg(model_dir, train_file, out_dir, method="kto", **extra)


# --- the loss --------------------------------------------------------------------------------------------


def test_kto_loss_hand_values():
    """beta 0.1, z0 0.5: desirable r = 2.5 -> 1 - sigma(0.2); undesirable r = -1.5 -> 1 - sigma(0.1 * (0.5 +
    1.5)) = 1 - sigma(0.2); desirable r = -0.5 -> 1 - sigma(-0.1); undesirable r = 3.0 -> 1 - sigma(-0.25)."""
    pi = torch.tensor([-10.0, -20.0, -5.5, -7.0])
    ref = torch.tensor([-12.5, -18.5, -5.0, -10.0])  # r = 2.5, -1.5, -0.5, 3.0
    labels = torch.tensor([True, False, True, False])
    out = kto_loss(pi, ref, labels, torch.tensor(0.5), beta=0.1)
    expected = [1 - sigmoid(0.2), 1 - sigmoid(0.2), 1 - sigmoid(-0.1), 1 - sigmoid(-0.25)]
    torch.testing.assert_close(out.losses, torch.tensor(expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, -0.05]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.15, 0.3]))
    weighted = kto_loss(pi, ref, labels, 0.5, beta=0.1, desirable_weight=3.0, undesirable_weight=2.0)
    torch.testing.assert_close(
        weighted.losses, torch.tensor(expected) * torch.tensor([3.0, 2.0, 3.0, 2.0]), rtol=0, atol=1e-7
    )
    # at pi = pi_ref and z0 = 0 every record's loss is its weight / 2
    half = kto_loss(ref, ref, labels, 0.0, beta=0.3, desirable_weight=1.5, undesirable_weight=0.5)
    torch.testing.assert_close(half.losses, torch.tensor([0.75, 0.25, 0.75, 0.25]))


def test_kto_reference_point_is_clamped_detached_mean():
    assert float(kto_reference_point(torch.tensor(2.0), 4)) == 0.5  # sums 3 and -1 over 4 pairs
    assert float(kto_reference_point(-2.0, 4)) == 0.0  # a negative mean is clamped at 0
    assert float(kto_reference_point(0.0, 0)) == 0.0  # no pairs: 0, not NaN
    x = torch.tensor(3.0, requires_grad=True)
    assert not kto_reference_point(x * 2, 3).requires_grad
    # z0 carries no gradient into the loss: d loss / d z0-input is zero even when given a graph
    pi = torch.tensor([-1.0, -2.0], requires_grad=True)
    z = pi.sum() + 4.0  # 1.0, with a gradient path that kto_loss must cut
    out = kto_loss(pi, torch.tensor([-1.5, -1.0]), torch.tensor([True, False]), z, beta=0.5)
    (g,) = torch.autograd.grad(out.losses.sum(), pi)
    r, z0 = torch.tensor([0.5, -1.0]), 1.0
    s_d, s_u = torch.sigmoid(0.5 * (r[0] - z0)), torch.sigmoid(0.5 * (z0 - r[1]))
    # d/dr (1 - sigma(b(r - z0))) = -b s (1 - s); d/dr (1 - sigma(b(z0 - r))) = +b s (1 - s)
    torch.testing.assert_close(g, torch.stack([-0.5 * s_d * (1 - s_d), 0.5 * s_u * (1 - s_u)]))


def trl_kto_losses(chosen_logps, rejected_logps, ref_chosen, ref_rejected, kl_logps, ref_kl, beta, wd, wu):
    """TRL's ``KTOTrainer`` loss (trl 1.16.0, trl/trainer/kto_trainer.py, ``_compute_loss``, loss_type 'kto',
    one process) restated: kl = clamp(mean(KL_logps - ref_KL_logps), min=0); desirable 1 - sigmoid(beta
    (logratio - kl)), undesirable 1 - sigmoid(beta (kl - logratio)); losses = cat(wd * chosen, wu * rejected)."""
    kl = (kl_logps - ref_kl).mean().detach().clamp(min=0)
    chosen = 1 - F.sigmoid(beta * ((chosen_logps - ref_chosen) - kl))
    rejected = 1 - F.sigmoid(beta * (kl - (rejected_logps - ref_rejected)))
    return torch.cat((wd * chosen, wu * rejected), 0), kl


def trl_source_losses(chosen_logps, rejected_logps, ref_chosen, ref_rejected, kl_logps, ref_kl, beta, wd, wu):
    """The same block executed from the installed TRL's own source (skips when trl is missing or changed)."""
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    src = inspect.getsource(kto_trainer.KTOTrainer._compute_loss)
    try:
        start = src.index("        if self.calculate_KL:\n            kl = (KL_logps")
        end = src.index('        self._metrics[mode]["kl"]')
    except ValueError:
        pytest.skip("this trl's KTOTrainer._compute_loss has another shape")
    accelerator = SimpleNamespace(gather_for_metrics=lambda t: t.reshape(1), device="cpu")
    trainer = SimpleNamespace(
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
        accelerator=accelerator,
    )  # fmt: skip
    scope = {
        "self": trainer, "torch": torch, "F": F, "KL_logps": kl_logps, "ref_KL_logps": ref_kl,
        "chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }  # fmt: skip
    exec(textwrap.dedent(src[start:end]), scope)
    return scope["losses"], scope["kl"]


@pytest.mark.parametrize("shift", [0.0, 3.0])  # z0 = 0 by the clamp, and z0 > 0
@pytest.mark.parametrize("implementation", [trl_kto_losses, trl_source_losses])
def test_kto_matches_trl_on_the_same_inputs(implementation, shift):
    gen = torch.Generator().manual_seed(0)
    b = 12
    labels = torch.rand(b, generator=gen) < 0.5
    labels[0], labels[1] = True, False
    pi = -20 + 5 * torch.randn(b, generator=gen, dtype=torch.float64)
    ref = pi + torch.randn(b, generator=gen, dtype=torch.float64)
    kl_pi = -25 + 5 * torch.randn(b, generator=gen, dtype=torch.float64)
    kl_ref = kl_pi - shift + 0.5 * torch.randn(b, generator=gen, dtype=torch.float64)
    beta, wd, wu = 0.2, 1.0, 1.33
    expected, trl_kl = implementation(
        pi[labels], pi[~labels], ref[labels], ref[~labels], kl_pi, kl_ref, beta, wd, wu
    )
    z0 = kto_reference_point((kl_pi - kl_ref).sum(), b)
    assert float(z0) == pytest.approx(float(trl_kl), abs=1e-12)
    assert (float(z0) > 0) == (shift > 0)
    out = kto_loss(pi, ref, labels, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    ours = torch.cat((out.losses[labels], out.losses[~labels]))
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=0, atol=1e-12)


# --- the reference point from mismatched pairs of the batch ------------------------------------------------


def hand_logps(model, prompt, response) -> float:
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
    return sum(float(logp[len(prompt) + k - 1, tok]) for k, tok in enumerate(response))


def test_kl_pairs_rotate_like_trl():
    recs = pairs_to_unpaired(
        [SimpleNamespace(prompt_ids=(1,), chosen_ids=(i, 2), rejected_ids=(i, 3), source=f"s{i}", truncated=False)
         for i in range(2)]
    )  # fmt: skip
    pairs = kl_pairs(recs)  # completions [c0, r0, c1, r1] -> KL completions [r1, c0, r0, c1]
    assert [p.chosen_ids for p in pairs] == [r.completion_ids for r in recs]
    assert [p.rejected_ids for p in pairs] == [recs[-1].completion_ids] + [
        r.completion_ids for r in recs[:-1]
    ]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_reference_point_from_mismatched_pairs_equals_slow_computation(
    tmp_path, tiny_model_dir, tiny_tokenizer, share_prefix
):
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(5))
    cfg = kto_cfg(tiny_model_dir, data, tmp_path / "run", training={"share_prefix": share_prefix})
    prep = prepare(cfg, quiet)
    start = load_model(str(tiny_model_dir)).eval()
    moved = copy.deepcopy(start)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    recs = prep.examples["train"]
    slow = [
        hand_logps(moved, r.prompt_ids, recs[i - 1].completion_ids)
        - hand_logps(start, r.prompt_ids, recs[i - 1].completion_ids)
        for i, r in enumerate(recs)
    ]  # record i's prompt with record i-1's completion (record 0: the last one's)
    policy, reference = (moved, start) if sum(slow) > 0 else (start, moved)  # a z0 the clamp leaves > 0
    sign = 1.0 if policy is moved else -1.0
    family = KTOFamily(cfg, prep.examples, tiny_tokenizer.pad_token_id)
    family.reference = build_reference(policy, during_training=True, load_copy=lambda: reference)
    losses, row = family.compute(policy, family.make_batch("train", list(range(len(recs)))))
    z0 = sign * sum(slow) / len(slow)
    assert z0 > 0.01
    assert row["kl"] == pytest.approx(z0, abs=1e-4)
    r = [
        hand_logps(policy, e.prompt_ids, e.completion_ids)
        - hand_logps(reference, e.prompt_ids, e.completion_ids)
        for e in recs
    ]
    beta = cfg.kto.beta
    expected = [
        1 - sigmoid(beta * (ri - z0)) if e.label else 1 - sigmoid(beta * (z0 - ri)) for ri, e in zip(r, recs)
    ]
    torch.testing.assert_close(
        losses.detach().double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
    )
    desirable = [ri for ri, e in zip(r, recs) if e.label]
    assert row["rewards/chosen"] == pytest.approx(beta * sum(desirable) / len(desirable), abs=1e-5)
    logps_u = [hand_logps(policy, e.prompt_ids, e.completion_ids) for e in recs if not e.label]
    assert row["logps/rejected"] == pytest.approx(sum(logps_u) / len(logps_u), abs=1e-4)
    _, only_desirable = family.compute(policy, family.make_batch("train", [0, 2]))
    assert math.isnan(only_desirable["rewards/rejected"]) and math.isnan(only_desirable["rewards/margins"])
    # summed over processes: the family uses the reduced sum and count
    family.reduce = lambda v: {**v, "kl_sum": v["kl_sum"] + 3.0 * 7, "kl_count": v["kl_count"] + 3}
    policy.train()
    _, row = family.compute(policy, family.make_batch("train", list(range(len(recs)))))
    assert row["kl"] == pytest.approx((z0 * len(recs) + 21.0) / (len(recs) + 3), abs=1e-4)


# --- data ------------------------------------------------------------------------------------------------


def validate_error(tmp_path, tiny_model_dir, records, **extra) -> str:
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as exc:
        preftune.validate(
            kto_cfg(tiny_model_dir, data, tmp_path / "run", **extra), load_weights=False, log=quiet
        )
    return str(exc.value)


def test_missing_and_non_boolean_labels_name_file_and_line(tmp_path, tiny_model_dir):
    records = unpaired_records(4)
    del records[1]["label"]
    records[2]["label"] = "yes"
    records[3]["label"] = 1
    message = validate_error(tmp_path, tiny_model_dir, records)
    assert "bad.jsonl line 2: field 'label': missing" in message
    assert "bad.jsonl line 3: field 'label': must be true or false, got str 'yes'" in message
    assert "bad.jsonl line 4: field 'label': must be true or false, got int 1" in message
    assert "line 1:" not in message


def test_every_bad_record_is_counted_over_both_splits(tmp_path, tiny_model_dir):
    """With data.eval_fraction the bad records of both splits are in one message: 15 of 19 rows bad, all 15
    counted and listed (up to 20), none hidden in the held-out part."""
    records = unpaired_records(19)
    for r in records[4:]:
        r["label"] = "yes"
    message = validate_error(tmp_path, tiny_model_dir, records, data={"eval_fraction": 0.25})
    assert message.startswith("15 problem(s) in 19 row(s):")
    assert sorted(int(line.split(" line ")[1].split(":")[0]) for line in message.splitlines()[1:]) == list(
        range(5, 20)
    )


def test_one_label_only_is_refused_with_counts(tmp_path, tiny_model_dir):
    records = [r for r in unpaired_records(6) if r["label"]]
    message = validate_error(tmp_path, tiny_model_dir, records)
    assert "bad.jsonl" in message and "line 1" in message
    assert "3 desirable and 0 undesirable" in message and "undesirable (label false)" in message
    data = write_jsonl(tmp_path / "ok.jsonl", records)  # one side switched off: accepted
    summary = preftune.validate(
        kto_cfg(tiny_model_dir, data, tmp_path / "run", kto={"undesirable_weight": 0.0}),
        load_weights=False,
        log=quiet,
    )
    assert summary["train_records"] == 3 and summary["train_undesirable"] == 0


def test_csv_labels_are_booleans(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nA,b,true\nC,d,False\nE,f,maybe\n", encoding="utf-8")
    rows = load_rows(path)
    assert [r["label"] for r in rows] == [True, False, "maybe"]
    assert rows[2]["_source"].endswith("kto.csv line 4")


def test_pair_data_gives_one_desirable_and_one_undesirable_record(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(3))
    prep = prepare(kto_cfg(tiny_model_dir, data, tmp_path / "run"), quiet)
    pairs, _ = tokenize_rows(load_rows(data), tiny_tokenizer, max_length=64, max_prompt_length=32)
    recs = prep.examples["train"]
    assert len(recs) == 6 and [r.label for r in recs] == [True, False] * 3
    for k, p in enumerate(pairs):
        assert recs[2 * k].prompt_ids == recs[2 * k + 1].prompt_ids == p.prompt_ids
        assert recs[2 * k].completion_ids == p.chosen_ids and recs[2 * k + 1].completion_ids == p.rejected_ids
        assert (
            recs[2 * k].source == f"{p.source} (chosen)"
            and recs[2 * k + 1].source == f"{p.source} (rejected)"
        )
    assert [r.index for r in recs] == list(range(6))


def test_config_section_and_weights(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(4))
    cfg = kto_cfg(tiny_model_dir, data, tmp_path / "run")
    assert vars(cfg.kto) == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert set(vars(cfg.kto)) == set(inspect.signature(kto_loss).parameters) - {
        "policy_logps", "ref_logps", "labels", "reference_point"
    }  # fmt: skip
    with pytest.raises(ConfigError, match="both 0"):
        kto_cfg(tiny_model_dir, data, tmp_path / "run", kto={"desirable_weight": 0, "undesirable_weight": 0})
    with pytest.raises(ConfigError, match="kto.beta"):
        kto_cfg(tiny_model_dir, data, tmp_path / "run", kto={"beta": 0})


def test_example_config_loads():
    cfg = load_config(ROOT / "configs" / "kto.yaml")
    assert cfg.method == "kto" and cfg.kto.desirable_weight == cfg.kto.undesirable_weight == 1.0


# --- training --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_first_step_loss_is_half_and_the_model_moves(tmp_path, tiny_model_dir, lora):
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(8))
    extra = {"model": {"lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}
    cfg = kto_cfg(
        tiny_model_dir, data, tmp_path / "run", training={"batch_size": 4}, **(extra if lora else {})
    )
    run_dir = preftune.train(cfg, log=quiet)
    rows = metrics(run_dir)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: every record lambda / 2
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):  # null: no record of a label
        assert rows[0][key] is None or abs(rows[0][key]) < 1e-6
    assert {"rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(rows[0])
    assert rows[1]["loss"] != pytest.approx(0.5, abs=1e-6)  # the model moved after step 1
    if not lora:
        before, after = weights(tiny_model_dir), weights(run_dir / "model")
        assert any(not torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["train_records"] == 8 and summary["train_desirable"] == 4


def test_weighted_first_step_loss(tmp_path, tiny_model_dir):
    records = unpaired_records(8)
    records[1]["label"] = True  # 5 desirable, 3 undesirable
    data = write_jsonl(tmp_path / "kto.jsonl", records)
    cfg = kto_cfg(
        tiny_model_dir, data, tmp_path / "run", training={"batch_size": 8, "max_steps": 1},
        kto={"desirable_weight": 2.0, "undesirable_weight": 0.5},
    )  # fmt: skip
    rows = metrics(preftune.train(cfg, log=quiet))
    assert rows[0]["loss"] == pytest.approx((5 * 1.0 + 3 * 0.25) / 8, abs=1e-6)


def test_model_moves_and_reference_stays(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(6))
    cfg = kto_cfg(tiny_model_dir, data, tmp_path / "run")
    prep = prepare(cfg, quiet)
    model = load_model(str(tiny_model_dir))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    family = KTOFamily(cfg, prep.examples, tiny_tokenizer.pad_token_id)
    family.reference = build_reference(model, during_training=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    rows = []
    for _ in range(3):
        losses, row = family.compute(model, family.make_batch("train", list(range(6))))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        rows.append(row)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[-1]["loss"] < rows[0]["loss"]
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    frozen = family.reference.frozen.state_dict()
    assert all(torch.equal(start[k], frozen[k]) for k in start)
    assert rows[-1]["rewards/chosen"] > 0 > rows[-1]["rewards/rejected"]  # desirable up, undesirable down


def test_two_processes_share_one_reference_point(tmp_path, tiny_model_dir):
    """Two CPU processes: the z0 collective runs once per micro-batch on both (an uneven last batch included,
    whose short rank runs the zero-weight stand-in), eval runs without it, and the first loss is 0.5."""
    import os
    import subprocess
    import sys

    import yaml

    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(9))
    cfg = {
        "method": "kto",
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 64, "max_prompt_length": 32},
        "training": {"output_dir": str(tmp_path / "two"), "batch_size": 2, "epochs": 1, "progress": False,
                     "learning_rate": 1e-3, "precompute_ref": False},
    }  # fmt: skip
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    done = subprocess.run([*launch, "train", str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(tmp_path / "two")
    assert [r["examples"] for r in rows] == [4, 3]  # 7 training records: the last batch splits 2 + 1
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    assert metrics(tmp_path / "two", "eval")


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    """Resuming full fine-tuning rebuilds pi_ref from the starting weights, not from the trained policy."""
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_records(8))
    sections = {"training": {"max_steps": 4, "save_every": 2}}
    run_a = preftune.train(kto_cfg(tiny_model_dir, data, tmp_path / "a", **sections), log=quiet)
    cfg_b = kto_cfg(tiny_model_dir, data, tmp_path / "b", **sections)

    def interrupt(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preftune.train(cfg_b, on_step_end=interrupt, log=quiet)
    preftune.train(cfg_b, resume=True, log=quiet)
    wa, wb = weights(run_a / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a, rows_b = metrics(run_a), metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        ra.pop("tokens_per_s"), rb.pop("tokens_per_s")
        assert ra == rb
