"""Online DPO end to end on the tiny random model: pairs ranked by reward (ties and missing rewards skipped
and counted), the first step's loss at π_θ = π_ref (ln 2; IPO's (1/(2β))²), the chosen completion is the
higher-reward one, the loss equals TRL's on the same inputs, the policy moves while the reference stays,
resume equals an uninterrupted run, 2 processes equal 1, the saved model loads, config errors."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import preftune
from preftune.config import ConfigError
from preftune.losses.pairwise import ONLINE_DPO_LOSSES
from preftune.training import train
from preftune.training.online_dpo import orient, rank_pairs


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(10)))
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """Rewards that tie by construction on the prompts with an even number and differ (almost surely) on the
    others; one that is constant; one that is missing on some completions."""
    (tmp_path / "odpo_rewards.py").write_text(
        textwrap.dedent(
            """
            def ties_on_even(prompts, completions, completion_ids):
                return [1.0 if int(p.split()[2]) % 2 == 0 else float(sum(ids) % 97) + len(ids) / 100
                        for p, ids in zip(prompts, completion_ids)]

            def constant(prompts, completions):
                return [0.5] * len(completions)

            def sometimes_none(prompts, completions, completion_ids):
                return [None if sum(ids) % 3 == 0 else float(sum(ids)) for ids in completion_ids]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    sys.modules.pop("odpo_rewards", None)


def config(model_dir, prompts, out, **sections):
    raw = {
        "method": "online_dpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {
            "output_dir": str(out),
            "max_steps": 3,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "progress": False,
        },
        "online_dpo": {
            "prompts_per_batch": 4,
            "rewards": ["odpo_rewards:ties_on_even"],
            "log_completions_every": 1,
        },
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return preftune.load_config(raw)


def rows(run, split="train"):
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


def completions(run, step):
    return [
        r for r in map(json.loads, (run / "completions.jsonl").read_text().splitlines()) if r["step"] == step
    ]


def test_rank_pairs_by_hand():
    nan = math.nan
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, nan, 1.0, 5.0, 0.0, nan, nan], dtype=torch.float64)
    ranked = rank_pairs(rewards).tolist()
    assert ranked == [-1, 1, 0, 0, 0, 0, 1, -1, 0, 0]
    assert all(math.copysign(1.0, v) > 0 for v in ranked if v == 0)  # completions.jsonl shows 0, not -0


def trl_online_dpo_loss(rewards, logps, ref_logps, beta, loss_type):
    """TRL 1.16.0's ``OnlineDPOTrainer.training_step`` loss on its inputs (trl/experimental/online_dpo/
    online_dpo_trainer.py, lines 1222-1255): completions [first of each prompt..., second...], per-completion
    summed log-probs; a tie goes to the first completion."""
    batch_size = len(rewards) // 2
    first_half, second_half = rewards.split(batch_size)
    mask = first_half >= second_half
    batch_range = torch.arange(batch_size)
    chosen_indices = batch_range + (~mask * batch_size)
    rejected_indices = batch_range + (mask * batch_size)
    logits = (logps[chosen_indices] - logps[rejected_indices]) - (
        ref_logps[chosen_indices] - ref_logps[rejected_indices]
    )
    if loss_type == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_pair_loss_equals_trl_on_the_same_inputs(loss_type):
    """4 prompts × 2 completions: our ranking, orientation and loss (mean over the used pairs) equal TRL's
    OnlineDPOTrainer loss when no pair ties; with a tie, TRL trains on it (first completion chosen) and we
    skip it: our loss is then TRL's over the other pairs."""
    beta = 0.1
    gen = torch.Generator().manual_seed(0)
    logps = -20 * torch.rand(8, generator=gen, dtype=torch.float64)
    ref = logps + torch.randn(8, generator=gen, dtype=torch.float64)
    rewards = torch.tensor([0.3, 1.2, 0.9, 0.1, 0.5, 0.7, 2.0, 1.1], dtype=torch.float64).view(4, 2)

    def ours(r):  # (P, 2) layout: a prompt's two completions consecutive
        side = rank_pairs(r.reshape(-1)).view(-1, 2)[:, 0]
        (pc, pr), (rc, rr) = orient(logps.view(4, 2), side), orient(ref.view(4, 2), side)
        out = ONLINE_DPO_LOSSES[loss_type](pc, pr, rc, rr, beta=beta)
        return out.losses[side != 0].mean()

    def trl(r, keep=slice(None)):  # TRL's layout: [first completions..., second completions...]
        cols = lambda x: torch.cat([x.view(4, 2)[keep, 0], x.view(4, 2)[keep, 1]])  # noqa: E731
        return trl_online_dpo_loss(cols(r), cols(logps), cols(ref), beta, loss_type)

    expected = {"sigmoid": 0.6987661, "ipo": 27.2421913}[loss_type]  # TRL's value on these inputs
    assert float(trl(rewards)) == pytest.approx(expected, abs=1e-6)
    assert float(ours(rewards)) == pytest.approx(float(trl(rewards)), abs=1e-12)
    tied = rewards.clone()
    tied[1, 1] = tied[1, 0]  # the second prompt ties: TRL trains on it, we skip it
    assert float(ours(tied)) == pytest.approx(float(trl(tied, keep=[0, 2, 3])), abs=1e-12)
    assert float(ours(tied)) != pytest.approx(float(trl(tied)), abs=1e-6)


def test_first_step_is_ln2_on_the_non_tie_pairs_and_chosen_is_the_higher_reward(
    tmp_path, tiny_model_dir, prompts, reward_module
):
    import preftune.training.online as online

    kept = {}
    real = online.setup_reference

    def keep(*args, **kwargs):
        ref = real(*args, **kwargs)
        kept["ref"], kept["start"] = ref, {k: v.clone() for k, v in ref.frozen.state_dict().items()}
        return ref

    online.setup_reference = keep
    try:
        run = train(
            config(tiny_model_dir, prompts, tmp_path / "run", generation={"temperature": 0.7}), log=quiet
        )
    finally:
        online.setup_reference = real
    train_rows = rows(run)
    for step, row in enumerate(train_rows, start=1):
        samples = completions(run, step)
        assert len(samples) == 8  # 4 prompts × 2 completions
        pairs = [samples[i : i + 2] for i in range(0, 8, 2)]
        ties = [p for p in pairs if p[0]["reward"] == p[1]["reward"]]
        assert row["pairs/ties"] == len(ties) and row["pairs/used"] == 4 - len(ties)
        assert row["pairs/missing_reward"] == 0
        for a, b in pairs:  # the chosen (+1) has the strictly higher reward; a tie is 0 on both sides
            if a["reward"] == b["reward"]:
                assert a["advantage"] == b["advantage"] == 0.0
            else:
                chosen, rejected = (a, b) if a["advantage"] == 1.0 else (b, a)
                assert (chosen["advantage"], rejected["advantage"]) == (1.0, -1.0)
                assert chosen["reward"] > rejected["reward"]
        used = [p for p in pairs if p[0]["reward"] != p[1]["reward"]]
        margin = sum(abs(a["reward"] - b["reward"]) for a, b in used) / max(len(used), 1)
        assert row["pairs/reward_margin"] == pytest.approx(margin)
    assert sum(r["pairs/ties"] for r in train_rows) >= 3  # even prompts tie by construction
    first = train_rows[0]
    assert first["pairs/used"] > 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π_θ = π_ref: h = 0 on every pair
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and first["rewards/accuracies"] == 0.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert train_rows[-1]["kl"] != 0.0
    after = kept["ref"].frozen.state_dict()
    assert all(torch.equal(after[k], kept["start"][k]) for k in after)  # π_ref stays
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(run / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the policy moved


def test_the_loss_takes_the_higher_reward_completion_as_chosen(
    tmp_path, tiny_model_dir, prompts, reward_module
):
    """By hand at step 1: the loss's (chosen, rejected) inputs are the summed log-probs of each pair's
    higher- and lower-reward completions (the sampler's own log-probs, which π_θ = π_ref reproduces)."""
    import preftune.losses.pairwise as pairwise
    from preftune.training.online_dpo import OnlineDPO

    seen, calls = {}, []
    real_prepare, real_loss = OnlineDPO.prepare, pairwise.ONLINE_DPO_LOSSES["sigmoid"]

    def prepare(self, model, rollout):
        real_prepare(self, model, rollout)
        seen.setdefault("rollout", rollout)

    def loss(*args, **kwargs):
        calls.append([a.detach().clone() for a in args])
        return real_loss(*args, **kwargs)

    OnlineDPO.prepare = prepare
    pairwise.ONLINE_DPO_LOSSES["sigmoid"] = loss
    try:
        cfg = config(
            tiny_model_dir,
            prompts,
            tmp_path / "run",
            training={"max_steps": 1},
            generation={"temperature": 0.7},
        )  # every log-prob at T: the sampler's, π_θ's and π_ref's
        train(cfg, log=quiet)
    finally:
        OnlineDPO.prepare, pairwise.ONLINE_DPO_LOSSES["sigmoid"] = real_prepare, real_loss
    rollout = seen["rollout"]
    pc, pr, rc, rr = (torch.cat(parts) for parts in zip(*calls))  # the micro-batches' pairs, in order
    sampled = rollout.sample_logps.double().sum(dim=1).view(-1, 2)
    rewards = rollout.rewards.view(-1, 2)
    checked = 0
    for j, (r0, r1) in enumerate(rewards.tolist()):
        if r0 == r1:
            continue  # a tie: its loss is masked out
        hi, lo = (0, 1) if r0 > r1 else (1, 0)
        assert float(pc[j]) == pytest.approx(float(sampled[j, hi]), abs=1e-4)
        assert float(pr[j]) == pytest.approx(float(sampled[j, lo]), abs=1e-4)
        assert float(rc[j]) == pytest.approx(float(sampled[j, hi]), abs=1e-4)  # π_ref = π_θ at step 1
        assert float(rr[j]) == pytest.approx(float(sampled[j, lo]), abs=1e-4)
        checked += 1
    assert checked >= 1 and float((sampled[:, 0] - sampled[:, 1]).abs().max()) > 1e-2  # a swap would show


def test_ties_and_missing_rewards_enter_no_loss(tmp_path, tiny_model_dir, prompts, reward_module):
    """A constant reward ties every pair: loss 0, no gradient, the model is unchanged (Adam on a zero
    gradient moves nothing). Pairs missing a reward are counted apart from ties."""
    cfg = config(tiny_model_dir, prompts, tmp_path / "c", online_dpo={"rewards": ["odpo_rewards:constant"]})
    run = train(cfg, log=quiet)
    for row in rows(run):
        assert (row["pairs/used"], row["pairs/ties"], row["loss"]) == (0, 4, 0.0)
        assert "rewards/margins" not in row and row["grad_norm"] == 0.0
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(base[k], trained[k]) for k in base)
    cfg = config(
        tiny_model_dir, prompts, tmp_path / "m", online_dpo={"rewards": ["odpo_rewards:sometimes_none"]}
    )
    run = train(cfg, log=quiet)
    for step, row in enumerate(rows(run), start=1):
        samples = completions(run, step)
        missing = sum(samples[i]["reward"] is None or samples[i + 1]["reward"] is None for i in (0, 2, 4, 6))
        assert row["pairs/missing_reward"] == missing
        assert row["pairs/used"] + row["pairs/ties"] + missing == 4
    assert sum(r["pairs/missing_reward"] for r in rows(run)) > 0


def test_lora_reference_is_the_base_with_adapters_off(tmp_path, tiny_model_dir, prompts, reward_module):
    lora = {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    run = train(config(tiny_model_dir, prompts, tmp_path / "run", model=lora), log=quiet)
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters moved
    first = rows(run)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert rows(run)[-1]["kl"] != 0.0  # the adapters-off reference stayed the base


def test_ipo_first_loss(tmp_path, tiny_model_dir, prompts, reward_module):
    beta = 0.25
    cfg = config(
        tiny_model_dir,
        prompts,
        tmp_path / "run",
        training={"max_steps": 1},
        online_dpo={"loss": "ipo", "beta": beta},
    )
    first = rows(train(cfg, log=quiet))[0]
    assert first["pairs/used"] > 0
    assert first["loss"] == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-6)  # h = 0: (0 − 1/(2β))²


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prompts, reward_module):
    sections = {"training": {"max_steps": 4, "save_every": 1}}
    plain = train(config(tiny_model_dir, prompts, tmp_path / "a", **sections), log=quiet)
    cfg = config(tiny_model_dir, prompts, tmp_path / "b", **sections)

    def stop(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=stop, log=quiet)
    train(cfg, resume=True, log=quiet)
    a, b = (load_file(run / "model" / "model.safetensors") for run in (plain, tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ra, rb in zip(rows(plain), rows(tmp_path / "b"), strict=True):
        for key in ("reward", "loss", "grad_norm", "pairs/used", "kl"):
            assert ra[key] == rb[key], key


def test_end_to_end_saves_a_loadable_model_with_finite_metrics(
    tmp_path, tiny_model_dir, prompts, reward_module
):
    from transformers import AutoModelForCausalLM

    cfg = config(
        tiny_model_dir, prompts, tmp_path / "run", data={"eval_fraction": 0.2}, training={"eval_every": 2}
    )
    run = train(cfg, log=quiet)
    train_rows = rows(run)
    keys = {"loss", "reward", "reward_std", "kl", "entropy", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "pairs/used",
            "pairs/ties", "pairs/missing_reward", "completions/mean_length", "completions/clipped_ratio",
            "sampling/logp_diff_mean", "sampling/logp_diff_max", "grad_norm", "lr"}  # fmt: skip
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for row in train_rows:
        assert keys <= set(row)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    assert train_rows[0]["sampling/logp_diff_max"] < 1e-4  # trained-on log-probs are the sampler's (fp32)
    evals = rows(run, "eval")
    assert [r["step"] for r in evals] == [0, 2, 3] and evals[0]["kl"] == 0.0 and evals[-1]["kl"] != 0.0
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    result = json.loads((run / "result.json").read_text())
    assert result["method"] == "online_dpo" and result["completions_per_batch"] == 8


def test_config_errors(tmp_path, tiny_model_dir, prompts):
    with pytest.raises(ConfigError, match="online_dpo.beta must be > 0"):
        config(tiny_model_dir, prompts, tmp_path / "r", online_dpo={"beta": 0.0})
    with pytest.raises(ConfigError, match="online_dpo.loss must be one of sigmoid, ipo"):
        config(tiny_model_dir, prompts, tmp_path / "r", online_dpo={"loss": "hinge"})
    with pytest.raises(ConfigError, match="unknown key.*'group_size'"):
        config(tiny_model_dir, prompts, tmp_path / "r", online_dpo={"group_size": 4})
    with pytest.raises(ConfigError, match="online_dpo.prompts_per_batch \\(20\\) is larger"):
        preftune.validate(
            config(tiny_model_dir, prompts, tmp_path / "r", online_dpo={"prompts_per_batch": 20}),
            load_weights=False,
        )


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_processes_equal_one(tmp_path, tiny_model_dir):
    """The loss is the mean over the step's non-tie pairs of every process (one global count): 2 ranks × 2
    prompts == 1 process × 4 prompts, also with pairs missing a reward (left out on some ranks only)."""
    import os
    import subprocess
    import sys

    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(8)))
    (tmp_path / "uneven_rewards.py").write_text(
        "def some_none(prompts, completions, completion_ids):\n"
        "    return [None if sum(ids) % 5 == 0 else float(sum(ids) % 7) for ids in completion_ids]\n"
    )

    def cfg(name):
        raw = {
            "method": "online_dpo",
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
            "generation": {"max_new_tokens": 6, "batch_size": 16},
            "training": {"output_dir": str(tmp_path / name), "max_steps": 3, "batch_size": 2,
                         "learning_rate": 1e-2, "progress": False},
            "online_dpo": {"prompts_per_batch": 4, "rewards": ["uneven_rewards:some_none"]},
        }  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "preftune.cli"]
    done = subprocess.run(
        [*launch, "train", str(cfg("two"))], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", str(cfg("one"))],
        env=env,
        check=True,
        capture_output=True,
    )
    a = load_file(tmp_path / "two" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    two, one = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for r2, r1 in zip(two, one, strict=True):
        for key in ("reward", "loss", "kl", "pairs/used", "pairs/ties", "pairs/missing_reward", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-5), key
    assert sum(r["pairs/missing_reward"] for r in one) > 0 and sum(r["pairs/used"] for r in one) >= 3
