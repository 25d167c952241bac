"""Offline pair losses: DPO, cDPO, IPO, hinge (SLiC), RPO, ODPO, SimPO and ORPO, one small pure function each.

Every function takes ``(B,)`` tensors of per-sequence log-probs -- summed over the response tokens only
(prompt and padding masked out) -- and returns a :class:`LossOutput` with the **unreduced** ``(B,)`` losses
and the detached implicit rewards. Reduction (mean over the batch, gradient accumulation) is the caller's.

Notation: ``pc, pr`` are log pi_theta(y_w|x), log pi_theta(y_l|x); ``rc, rr`` the same under pi_ref;
h = (pc - rc) - (pr - rr). All maths runs in at least float32: inputs are upcast to float32, and float64
inputs (scores that differ in the 9th digit) stay float64.

Where we depart from the papers or from TRL (also in docs/methods.md):
- IPO uses h from the log-probs *as given* (summed, like the IPO paper); TRL length-averages them for IPO,
  so the same beta means a different loss there.
- SimPO's gamma is the absolute target margin, not the ratio gamma/beta (the paper's ratio 0.3-0.8 means
  gamma = ratio * beta). Summed log-probs go in; the length normalisation happens here.
- RPO's NLL term is on the chosen response only, per token: -pc / |y_w|.
- ODPO's offset is validated: the log offset needs s_w > s_l strictly, so ties are an error, not a silent
  -inf. Lengths are clamped to >= 1, so a fully truncated response cannot produce NaN.
- ORPO's NLL term is on the chosen response only, per token (-pc / |y_w|), averaged per pair; TRL's is one
  token mean over the whole batch of chosen sequences, prompt tokens included. Its odds-ratio term equals
  TRL's ``odds_ratio_loss``, except that the mean log-prob is clamped to <= -1e-6 inside the log-odds (TRL
  gives inf and a NaN gradient at a mean log-prob of exactly 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ODPO_OFFSETS = ("log", "identity", "log_ratio")


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per-example, unreduced
    chosen_rewards: torch.Tensor | None = None  # (B,) detached implicit rewards
    rejected_rewards: torch.Tensor | None = None  # (B,) detached
    metrics: dict[str, torch.Tensor] | None = None  # method's own (B,) detached diagnostics, logged as means


def _as_float(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Upcast to at least float32 (float64 stays float64) and check that every input is a 1-D tensor of
    the same shape (no broadcasting)."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"loss inputs must all be (B,) tensors of one shape, got shapes {sorted(shapes)}")
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _logratio_margin(pc, pr, rc, rr) -> torch.Tensor:
    return (pc - rc) - (pr - rr)  # h = [log pi(y_w)/pi_ref(y_w)] - [log pi(y_l)/pi_ref(y_l)]   (B,)


def _dpo_rewards(losses, pc, pr, rc, rr, beta: float) -> LossOutput:
    # implicit reward r(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x)   (DPO, arXiv 2305.18290, Sec. 5)
    return LossOutput(losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach())


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7); cDPO when ``label_smoothing`` = eps > 0.

    loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h); all inputs ``(B,)``, losses ``(B,)``.
    eps is the assumed probability that a label is flipped (cDPO, Mitchell 2023); eps = 0 is plain DPO.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc, pr, rc, rr = _as_float(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = _logratio_margin(pc, pr, rc, rr)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return _dpo_rewards(losses, pc, pr, rc, rr, beta)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036): loss = (h - 1/(2 beta))^2, inputs and losses ``(B,)``.

    beta plays the role of the paper's tau. h comes from the log-probs as given -- summed over response
    tokens in preftune, as in the paper; TRL length-averages the log-probs for IPO instead.
    """
    _check_beta(beta)
    pc, pr, rc, rr = _as_float(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = _logratio_margin(pc, pr, rc, rr)  # (B,)
    losses = (h - 1 / (2 * beta)) ** 2  # (h - 1/(2 tau))^2
    return _dpo_rewards(losses, pc, pr, rc, rr, beta)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv 2305.10425) on the reference-normalised likelihood
    (as in RSO, Liu et al. 2023, arXiv 2309.06657): loss = max(0, 1 - beta * h); ``(B,)`` in and out."""
    _check_beta(beta)
    pc, pr, rc, rr = _as_float(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = _logratio_margin(pc, pr, rc, rr)  # (B,)
    losses = torch.relu(1 - beta * h)  # max(0, 1 - beta h)
    return _dpo_rewards(losses, pc, pr, rc, rr, beta)


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    *,
    beta: float,
    alpha: float,
) -> LossOutput:
    """RPO / DPO+NLL (Pang et al. 2024, arXiv 2404.19733): loss = DPO(h) + alpha * NLL(y_w) / |y_w|.

    ``chosen_lengths`` ``(B,)`` is |y_w| in response tokens (clamped to >= 1). The NLL term is on the chosen
    response only: NLL(y_w) / |y_w| = -log pi_theta(y_w|x) / |y_w|. Inputs and losses ``(B,)``.
    """
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    out = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    pc, n_w = _as_float(policy_chosen_logps, chosen_lengths)
    nll_per_token = -pc / n_w.clamp(min=1.0)  # NLL(y_w) / |y_w|   (B,)
    return LossOutput(out.losses + alpha * nll_per_token, out.chosen_rewards, out.rejected_rewards)


def odpo_offset(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    alpha: float = 1.0,
    offset: str = "log",
) -> torch.Tensor:
    """ODPO offset Delta ``(B,)`` (Amini et al. 2024, arXiv 2402.10571) from per-example scores s_w, s_l ``(B,)``.

    - ``"log"``:       Delta = alpha * log(s_w - s_l); needs s_w > s_l strictly (ties are an error).
    - ``"identity"``:  Delta = alpha * (s_w - s_l); any finite scores.
    - ``"log_ratio"``: Delta = alpha * (log s_w - log s_l); needs s_w > 0 and s_l > 0.

    Non-finite scores, or scores outside the offset's domain, raise ValueError naming the rows and values.
    """
    if offset not in ODPO_OFFSETS:
        raise ValueError(f"unknown ODPO offset {offset!r}; valid offsets: {', '.join(ODPO_OFFSETS)}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    s_w, s_l = _as_float(chosen_scores, rejected_scores)
    _check_rows(s_w.isfinite() & s_l.isfinite(), s_w, s_l, "scores must be finite")
    if offset == "log":
        why = "offset='log' needs chosen score > rejected score strictly; drop ties or use offset='identity'"
        _check_rows(s_w > s_l, s_w, s_l, why)
        return alpha * torch.log(s_w - s_l)  # Delta = alpha log(s_w - s_l)
    if offset == "log_ratio":
        _check_rows((s_w > 0) & (s_l > 0), s_w, s_l, "offset='log_ratio' needs both scores > 0")
        return alpha * (torch.log(s_w) - torch.log(s_l))  # Delta = alpha (log s_w - log s_l)
    return alpha * (s_w - s_l)  # Delta = alpha (s_w - s_l)


class OffsetDomainError(ValueError):
    """Scores outside the ODPO offset's domain; ``rows`` holds every offending row index."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


def _check_rows(ok: torch.Tensor, s_w: torch.Tensor, s_l: torch.Tensor, why: str) -> None:
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        shown = bad[:10]
        values = ", ".join(f"({s_w[i].item():.7g}, {s_l[i].item():.7g})" for i in shown)
        more = f" (showing the first {len(shown)})" if len(bad) > len(shown) else ""
        raise OffsetDomainError(
            f"ODPO: {why}; {len(bad)} bad row(s){more}: rows {shown} with (chosen, rejected) scores [{values}]",
            bad,
        )


def odpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    offset: str = "log",
) -> LossOutput:
    """ODPO (Amini et al. 2024, arXiv 2402.10571): loss = -log sigma(beta * h - Delta), inputs/losses ``(B,)``.

    Delta = :func:`odpo_offset` (chosen_scores, rejected_scores); alpha = 0 gives exactly DPO.
    """
    _check_beta(beta)
    delta = odpo_offset(chosen_scores, rejected_scores, alpha=alpha, offset=offset)  # (B,)
    pc, pr, rc, rr = _as_float(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h = _logratio_margin(pc, pr, rc, rr)  # (B,)
    losses = -F.logsigmoid(beta * h - delta)  # -log sigma(beta h - Delta)
    return _dpo_rewards(losses, pc, pr, rc, rr, beta)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): no reference model; all inputs and losses ``(B,)``.

    loss = -log sigma(beta/|y_w| * log pi(y_w|x) - beta/|y_l| * log pi(y_l|x) - gamma), from SUMMED log-probs
    and response lengths (clamped to >= 1). gamma is the absolute margin (paper's gamma/beta ratio * beta).
    Rewards are the length-normalised beta * log pi(y|x) / |y|.
    """
    _check_beta(beta)
    pc, pr, n_w, n_l = _as_float(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    r_w = beta * pc / n_w.clamp(min=1.0)  # beta/|y_w| log pi(y_w|x)   (B,)
    r_l = beta * pr / n_l.clamp(min=1.0)  # beta/|y_l| log pi(y_l|x)   (B,)
    losses = -F.logsigmoid(r_w - r_l - gamma)  # -log sigma(r_w - r_l - gamma)
    return LossOutput(losses, r_w.detach(), r_l.detach())


ORPO_MAX_MEAN_LOGP = -1e-6  # the mean log-prob is clamped to this inside ORPO's log-odds (odds <= 1e6)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) elementwise for x < 0, without cancellation (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) below. Same shape in and out; x = 0
    gives -inf (callers clamp x below 0)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4, 6, 7): no reference model; all inputs and losses ``(B,)``.

    With the mean token log-prob l = log pi(y|x) / |y| (SUMMED log-probs in, lengths clamped to >= 1),
    p = exp(l) and odds(y) = p / (1 - p), i.e. log odds = l - log(1 - exp(l)):

        loss = -l_w + beta * -log sigma(log odds(y_w) - log odds(y_l))

    -l_w is the NLL of the chosen response per token; beta is the paper's lambda (TRL's ``beta``, default
    0.1). log(1 - exp(l)) is :func:`log1mexp` of l clamped to <= ``ORPO_MAX_MEAN_LOGP`` = -1e-6, so l = 0 (an
    empty or certain response) gives log odds ~ 13.8 and finite gradients; the clamp stops the odds-ratio
    gradient of a response whose mean token probability is above 1 - 1e-6 (the NLL gradient still flows).

    Rewards are beta * l, as TRL's ORPO logs them. ``metrics`` holds TRL's diagnostics per pair:
    ``nll_loss`` = -l_w, ``log_odds_ratio`` = log sigma(log odds(y_w) - log odds(y_l)) and
    ``log_odds_chosen`` = log odds(y_w) - log odds(y_l) (TRL's names).
    """
    _check_beta(beta)
    pc, pr, n_w, n_l = _as_float(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    l_w = pc / n_w.clamp(min=1.0)  # mean token log-prob of y_w   (B,)
    l_l = pr / n_l.clamp(min=1.0)  # of y_l   (B,)

    def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
        x = mean_logp.clamp(max=ORPO_MAX_MEAN_LOGP)
        return x - log1mexp(x)  # log p - log(1 - p)

    z = log_odds(l_w) - log_odds(l_l)  # log odds ratio   (B,)
    nll = -l_w  # NLL(y_w) / |y_w|   (B,)
    losses = nll - beta * F.logsigmoid(z)  # -l_w - beta log sigma(z)
    metrics = {
        "nll_loss": nll.detach(),
        "log_odds_ratio": F.logsigmoid(z).detach(),
        "log_odds_chosen": z.detach(),
    }
    return LossOutput(losses, (beta * l_w).detach(), (beta * l_l).detach(), metrics)


def pair_metrics(
    out: LossOutput,
    policy_chosen_logps: torch.Tensor | None = None,
    policy_rejected_logps: torch.Tensor | None = None,
) -> dict[str, float]:
    """Batch means of the standard pair metrics: ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``
    (accuracy: fraction with chosen reward strictly > rejected) and ``logps/{chosen,rejected}``.
    Keys whose inputs are None (rewards of a loss without them, logps for a reward model) are omitted; a
    loss's own ``metrics`` (ORPO's ``nll_loss``, ...) are added as batch means under their names."""
    metrics = {"loss": out.losses.detach().double().mean().item()}
    if out.chosen_rewards is not None and out.rejected_rewards is not None:
        r_w, r_l = out.chosen_rewards.detach().double(), out.rejected_rewards.detach().double()
        metrics["rewards/chosen"] = r_w.mean().item()
        metrics["rewards/rejected"] = r_l.mean().item()
        metrics["rewards/margins"] = (r_w - r_l).mean().item()
        metrics["rewards/accuracies"] = (r_w > r_l).float().mean().item()
    if policy_chosen_logps is not None:
        metrics["logps/chosen"] = policy_chosen_logps.detach().double().mean().item()
    if policy_rejected_logps is not None:
        metrics["logps/rejected"] = policy_rejected_logps.detach().double().mean().item()
    for name, values in (out.metrics or {}).items():
        metrics[name] = values.detach().double().mean().item()
    return metrics


# --- how each pair method is fed ------------------------------------------------------------------------
# The trainer computes these named (B,) inputs for a batch; each method lists the ones its loss takes,
# in its positional order. A method that takes no reference log-probs is reference-free, and then no
# reference model is loaded or run.

POLICY = ("policy_chosen_logps", "policy_rejected_logps")
REFERENCE = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass(frozen=True)
class PairMethod:
    """A pair method: its loss function and the named batch inputs it takes, in order."""

    loss: Callable[..., LossOutput]
    inputs: tuple[str, ...]

    @property
    def reference_free(self) -> bool:
        return not set(REFERENCE) & set(self.inputs)

    def __call__(self, inputs: dict[str, torch.Tensor], **options) -> LossOutput:
        return self.loss(*(inputs[name] for name in self.inputs), **options)


PAIR_METHODS: dict[str, PairMethod] = {
    "dpo": PairMethod(dpo_loss, POLICY + REFERENCE),
    "ipo": PairMethod(ipo_loss, POLICY + REFERENCE),
    "hinge": PairMethod(hinge_loss, POLICY + REFERENCE),
    "rpo": PairMethod(rpo_loss, POLICY + REFERENCE + ("chosen_lengths",)),
    "odpo": PairMethod(odpo_loss, POLICY + REFERENCE + ("score_chosen", "score_rejected")),
    "simpo": PairMethod(simpo_loss, POLICY + ("chosen_lengths", "rejected_lengths")),
    "orpo": PairMethod(orpo_loss, POLICY + ("chosen_lengths", "rejected_lengths")),
}

# online DPO's `online_dpo.loss` vocabulary (TRL's OnlineDPOConfig.loss_type names): the pair loss each name
# applies to a sampled pair, both on summed response log-probs
ONLINE_DPO_LOSSES: dict[str, Callable[..., LossOutput]] = {"sigmoid": dpo_loss, "ipo": ipo_loss}
