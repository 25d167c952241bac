"""Tests that catch a wrong trainer: each recomputes what one optimizer step must do from the run's own logs
and samples, with a hand forward pass of the model (a plain model call, log_softmax, gather), never the
library's log-prob path or the trainer's numbers.

Why these and not "the weights moved": AdamW's first update is lr·sign(g), and gradient clipping hides
scale, so a rescaled loss (advantages halved) takes the very same first step, and a negated one moves as
far the other way. Direction is checked by the objective the step must raise; scale by the logged gradient
norm against the hand gradient's.
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import preftune
from preftune.training import train

LR = 1e-3


def quiet(*args, **kwargs) -> None:
    pass


def rows(run, split="train"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"The movie {i} was"}) + "\n" for i in range(8)))
    return path


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    """Reward functions of the sampled ids (so the test can recompute them), and a constant one."""
    (tmp_path / "check_rewards.py").write_text(
        textwrap.dedent(
            """
            def by_ids(prompts, completions, completion_ids):
                return [float(sum(ids) % 7) / 7 for ids in completion_ids]

            def constant(prompts, completions):
                return [0.5] * len(completions)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    sys.modules.pop("check_rewards", None)


def by_ids(ids: list[int]) -> float:
    return float(sum(ids) % 7) / 7


@pytest.fixture
def rollouts(monkeypatch):
    """Every rollout the online loop collects (its samples: prompt and completion token ids), wherever the
    loop calls :func:`collect_rollout` from."""
    import sys

    import preftune.training.rollout as rollout_module

    seen = []
    real = rollout_module.collect_rollout

    def keep(**kwargs):
        rollout, timings = real(**kwargs)
        seen.append(rollout)
        return rollout, timings

    for name, module in list(sys.modules.items()):
        if name.startswith("preftune.training") and getattr(module, "collect_rollout", None) is real:
            monkeypatch.setattr(module, "collect_rollout", keep)
    return seen


def online_config(method, model_dir, prompts, out, **sections):
    raw = {
        "method": method,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(prompts), "max_length": 48, "max_prompt_length": 24},
        "generation": {"max_new_tokens": 6, "batch_size": 16},
        "training": {"output_dir": str(out), "max_steps": 1, "batch_size": 4, "learning_rate": LR,
                     "progress": False},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return preftune.load_config(raw)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def hand_logits(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(completion), V) logits / T at the positions that predict each completion token: a plain call."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids).logits[0]  # (T, V)
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / temperature


def hand_logps(model, prompt, completion, temperature: float = 1.0) -> torch.Tensor:
    """(len(completion),) log π(o_t | x, o_<t): log_softmax of the plain call's logits, gathered."""
    logp = torch.log_softmax(hand_logits(model, prompt, completion, temperature), dim=-1)
    return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def hand_entropy(model, prompt, completion, temperature: float = 1.0) -> torch.Tensor:
    """(len(completion),) entropy −Σ p log p of the next-token distribution at each completion position."""
    logp = torch.log_softmax(hand_logits(model, prompt, completion, temperature), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages_by_hand(rewards: list[float], group_size: int, eps: float = 1e-4) -> list[float]:
    """GRPO's Â_i = (r_i − mean(r)) / (std(r) + eps) per group (unbiased std); 0 for a group without spread."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if max(group) == min(group):
            out += [0.0] * len(group)
            continue
        mean, std = statistics.fmean(group), statistics.stdev(group)
        out += [(r - mean) / (std + eps) for r in group]
    return out


# --- GRPO: one step raises Σ Â_i · log π(o_i), with the gradient's size --------------------------------


def test_grpo_step_raises_the_advantage_weighted_logprob(
    tmp_path, tiny_model_dir, prompts, rewards, rollouts
):
    G = 4
    cfg = online_config(
        "grpo", tiny_model_dir, prompts, tmp_path / "run",
        grpo={"completions_per_prompt": G, "prompts_per_batch": 2, "rewards": ["check_rewards:by_ids"],
              "log_completions_every": 1},
    )  # fmt: skip
    run = train(cfg, log=quiet)
    (rollout,) = rollouts
    T = cfg.generation.temperature
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    # the logged rewards are the reward function's on the sampled ids; the advantages come from them
    logged = [s["reward"] for s in samples]
    assert logged == [by_ids(c) for c in rollout.completion_ids]
    adv = group_advantages_by_hand(logged, G)
    assert any(a != 0 for a in adv)
    assert [s["advantage"] for s in samples] == pytest.approx(adv, abs=1e-5)

    pairs = list(zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    n_tokens = sum(len(c) for _, c in pairs)

    def objective(model) -> torch.Tensor:  # J = Σ_i Â_i Σ_t log π(o_i,t) / N_tokens (token_mean)
        return sum(a * hand_logps(model, p, c, T).sum() for a, (p, c) in zip(adv, pairs)) / n_tokens

    before, after = load(tiny_model_dir), load(run / "model")
    j0 = objective(before)
    j0.backward()
    j0 = j0.detach()
    grads = {n: p.grad.detach().clone() for n, p in before.named_parameters()}
    with torch.no_grad():
        j1 = objective(after)
    row = rows(run)[0]
    assert row["reward"] == pytest.approx(statistics.fmean(logged), rel=1e-9)
    # the loss at ρ = 1 is −Σ_i Â_i·|o_i| / N_tokens and its gradient −∇J: its norm is the logged one
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)  # measured: 2e-7
    assert row["loss"] == pytest.approx(
        -sum(a * len(c) for a, (_, c) in zip(adv, pairs)) / n_tokens, abs=1e-6
    )
    # direction: AdamW's first step is lr·sign(∇J) where the gradient is well above Adam's eps
    start, end = (
        load_file(tiny_model_dir / "model.safetensors"),
        load_file(run / "model" / "model.safetensors"),
    )
    agree = total = 0
    gain = 0.0
    for name, g in grads.items():
        delta = end[name] - start[name]
        big = g.abs() > 1e-6
        agree += int((torch.sign(delta[big]) == torch.sign(g[big])).sum())
        total += int(big.sum())
        gain += float((g.double() * delta.double()).sum())
    assert total > 1000 and agree / total > 0.99
    assert float(j1 - j0) > 0  # the step raised the advantage-weighted log-prob
    assert float(j1 - j0) == pytest.approx(gain, rel=0.1)  # by ∇J·Δθ to first order (measured: 1%)


# --- PPO: the shaped reward, GAE at the configured γ and λ, the entropy bonus ---------------------------


def ppo_config(model_dir, prompts, out, **sections):
    ppo = {"prompts_per_batch": 4, "completions_per_prompt": 2, "epochs": 1, "minibatches": 2,
           "rewards": ["check_rewards:by_ids"], **sections.pop("ppo", {})}  # fmt: skip
    return online_config("ppo", model_dir, prompts, out, ppo=ppo, **sections)


def slow_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Â_t = δ_t + γλ·Â_{t+1}, δ_t = r_t + γ·V_{t+1} − V_t, for one completion; V and Â after its end are 0."""
    out = [0.0] * len(rewards)
    next_value = next_adv = 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        out[t], next_value = next_adv, values[t]
    return out


def test_ppo_shaped_reward_and_gae_equal_a_slow_reference(tmp_path, tiny_model_dir, prompts, rewards):
    """Batch 2 (steps 3-4) is sampled after two updates: π_old ≠ π_ref and the critic's values are ≠ 0, so a
    KL term dropped from the reward, or γ and λ swapped in GAE (γλ is the same; δ's γ·V_{t+1} is not),
    shows."""
    gamma, lam, beta = 0.9, 0.7, 0.5
    cfg = ppo_config(
        tiny_model_dir, prompts, tmp_path / "run",
        ppo={"gamma": gamma, "lam": lam, "beta": beta},
        training={"max_steps": 4, "save_every": 1, "learning_rate": 1e-2},
    )  # fmt: skip
    run = train(cfg, log=quiet)
    train_rows = rows(run)
    T = cfg.generation.temperature
    for row in train_rows:  # every row: R − β·KL per completion
        assert row["reward_shaped"] == pytest.approx(row["reward"] - row["kl_coef"] * row["kl"], abs=1e-6)
    assert abs(train_rows[2]["kl_coef"] * train_rows[2]["kl"]) > 1e-3  # batch 2's KL term is visible

    ckpt = run / "checkpoints" / "step-0000003"  # between batch 2's two minibatches: its rollout is kept
    meta = json.loads((ckpt / "rollout-0.json").read_text())
    stored = load_file(ckpt / "rollout-0.safetensors")
    assert meta["batch"] == 1
    policy = load(
        run / "checkpoints" / "step-0000002" / "model"
    )  # π_old: the policy batch 2 was sampled from
    base = load(tiny_model_dir)  # π_ref
    kl_sum, score_sum, adv, returns = 0.0, 0.0, [], []
    for i, (p, c) in enumerate(zip(meta["prompt_ids"], meta["completion_ids"], strict=True)):
        L = len(c)
        with torch.no_grad():
            old, ref = hand_logps(policy, p, c, T), hand_logps(base, p, c, T)
        torch.testing.assert_close(stored["old_logps"][i, :L], old, rtol=0, atol=1e-5)
        torch.testing.assert_close(stored["ref_logps"][i, :L], ref, rtol=0, atol=1e-5)
        score = by_ids(c)
        assert float(stored["rewards"][i]) == score
        kl_t = (old - ref).tolist()  # k1, the papers'
        shaped = [-beta * k for k in kl_t]
        shaped[-1] += score
        values = stored["values"][i, :L].tolist()
        a = slow_gae(shaped, values, gamma, lam)
        adv.append(a)
        returns.append([x + v for x, v in zip(a, values)])
        kl_sum += sum(kl_t)
        score_sum += score
    n = len(meta["completion_ids"])
    row = train_rows[2]
    assert row["kl"] == pytest.approx(kl_sum / n, rel=1e-4, abs=1e-7)
    assert row["reward_shaped"] == pytest.approx((score_sum - beta * kl_sum) / n, rel=1e-4, abs=1e-7)
    flat = [x for a in adv for x in a]
    mean, var = statistics.fmean(flat), statistics.variance(flat)
    values_seen = 0.0
    for i, c in enumerate(meta["completion_ids"]):
        L = len(c)
        torch.testing.assert_close(stored["returns"][i, :L], torch.tensor(returns[i]), rtol=0, atol=1e-5)
        whitened = torch.tensor([(x - mean) / math.sqrt(var + 1e-8) for x in adv[i]])
        torch.testing.assert_close(stored["advantages"][i, :L], whitened, rtol=0, atol=1e-4)
        values_seen = max(values_seen, float(stored["values"][i, :L].abs().max()))
    assert abs(gamma - lam) * values_seen > 1e-3  # γ and λ swapped would move the returns this much


def test_ppo_entropy_bonus_raises_the_entropy(tmp_path, tiny_model_dir, prompts, rewards, rollouts):
    """A step with the entropy term alone: a zero reward with β = 0 makes the advantages, the returns and the
    values (the head starts at 0) all 0, so the policy and value losses have no gradient. The step must raise
    the mean token entropy of the sampled positions, with the gradient −c·∇H̄ (its norm is logged)."""
    coef = 0.5
    (tmp_path / "zero_reward.py").write_text(
        "def zero(prompts, completions):\n    return [0.0] * len(completions)\n"
    )
    cfg = ppo_config(
        tiny_model_dir, prompts, tmp_path / "run",
        ppo={"beta": 0.0, "minibatches": 1, "entropy_coef": coef, "rewards": ["zero_reward:zero"]},
    )  # fmt: skip
    run = train(cfg, log=quiet)
    (rollout,) = rollouts
    T = cfg.generation.temperature
    pairs = list(zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    n_tokens = sum(len(c) for _, c in pairs)

    def mean_entropy(model) -> torch.Tensor:
        return sum(hand_entropy(model, p, c, T).sum() for p, c in pairs) / n_tokens

    before, after = load(tiny_model_dir), load(run / "model")
    h0 = mean_entropy(before)
    h0.backward()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in before.parameters()))
    with torch.no_grad():
        h1 = float(mean_entropy(after))
    row = rows(run)[0]
    assert row["entropy"] == pytest.approx(float(h0), rel=1e-5)
    assert row["policy_loss"] == 0.0 and row["value_loss"] == 0.0
    assert row["grad_norm"] == pytest.approx(coef * norm, rel=1e-4)
    assert h1 > float(h0) + 1e-4  # the bonus raised the entropy


# --- LoRA: the reference is the base with adapters off, also once the adapters have moved ---------------

LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def with_adapter(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load(model_dir), adapter_dir).eval()


def test_grpo_lora_reference_after_updates_is_the_base(tmp_path, tiny_model_dir, prompts, rewards):
    """Batch 2 is prepared after two updates (adapters on ≠ off): the π_ref log-probs its KL term uses (kept in
    the checkpoint between its μ = 2 steps) are the base model's, not the adapted policy's, and the logged KL
    is k3 between the two."""
    cfg = online_config(
        "grpo", tiny_model_dir, prompts, tmp_path / "run", model={"lora": LORA},
        training={"max_steps": 4, "save_every": 1, "learning_rate": 1e-2},
        grpo={"completions_per_prompt": 4, "prompts_per_batch": 2, "updates_per_batch": 2, "beta": 0.1,
              "rewards": ["check_rewards:by_ids"]},
    )  # fmt: skip
    run = train(cfg, log=quiet)
    T = cfg.generation.temperature
    ckpt = run / "checkpoints" / "step-0000003"
    meta = json.loads((ckpt / "rollout-0.json").read_text())
    stored = load_file(ckpt / "rollout-0.safetensors")
    assert meta["batch"] == 1
    base = load(tiny_model_dir)
    policy = with_adapter(tiny_model_dir, run / "checkpoints" / "step-0000002" / "model")  # batch 2's π_old
    kl_sum, tokens, apart = 0.0, 0, 0.0
    for i, (p, c) in enumerate(zip(meta["prompt_ids"], meta["completion_ids"], strict=True)):
        L = len(c)
        with torch.no_grad():
            off, on = hand_logps(base, p, c, T), hand_logps(policy, p, c, T)
        torch.testing.assert_close(stored["ref_logps"][i, :L], off, rtol=0, atol=1e-5)  # adapters off
        torch.testing.assert_close(stored["old_logps"][i, :L], on, rtol=0, atol=1e-5)  # adapters on
        apart = max(apart, float((on - off).abs().max()))
        x = off - on
        kl_sum += float((torch.exp(x) - x - 1).sum())
        tokens += L
    assert apart > 1e-2  # adapters on ≠ off: a reference that is the live policy would show
    # step 3 is batch 2's first update: π_θ = π_old, so its KL is k3(π_old, π_ref), token mean
    assert rows(run)[2]["kl"] == pytest.approx(kl_sum / tokens, rel=1e-3)


def test_dpo_lora_reference_on_the_fly_after_step_one_is_the_base(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Reference on every batch (no precomputation): at step 2 the adapters have moved, and the reference
    log-probs the loss used (logged: log π − r̂/β) are the base model's."""
    from test_training import pair_records, raw_config, write_jsonl

    from preftune.config import train_config_from_dict
    from preftune.data import prompt_ids, response_ids
    from preftune.training.loop import StepPlan

    records = pair_records(8)
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    beta = 0.1
    raw = raw_config(
        tiny_model_dir, data, tmp_path / "run", model={"lora": LORA},
        training={"precompute_ref": False, "learning_rate": 1e-2, "save_every": 1}, dpo={"beta": beta},
    )  # fmt: skip
    run = train(train_config_from_dict(raw), log=quiet)
    row = rows(run)[1]
    _, (indices,) = StepPlan(8, 2, 1, 0).step(1)  # step 2's pairs (examples are the file's lines)
    base = load(tiny_model_dir)
    policy = with_adapter(tiny_model_dir, run / "checkpoints" / "step-0000001" / "model")
    off, on = [], []
    for i in indices:
        p = prompt_ids(tiny_tokenizer, records[i]["prompt"])
        c = response_ids(tiny_tokenizer, records[i]["chosen"])
        with torch.no_grad():
            off.append(float(hand_logps(base, p, c).sum()))
            on.append(float(hand_logps(policy, p, c).sum()))
    assert row["logps/chosen"] == pytest.approx(statistics.fmean(on), abs=1e-4)  # the policy: adapters on
    used = row["logps/chosen"] - row["rewards/chosen"] / beta
    assert used == pytest.approx(statistics.fmean(off), abs=1e-4)  # the reference: adapters off
    assert abs(statistics.fmean(on) - statistics.fmean(off)) > 1e-2  # and the two differ
