"""Preference tuning (``glmlab finetune dpo``): Direct Preference Optimization (Rafailov et al., 2023) and three
variants, on ``{"prompt", "chosen", "rejected"}`` JSONL (plain text, or messages rendered by the run's chat
template), against a frozen reference — the init run.

With π the policy and π_ref the reference, each completion's reward is β (log π(y|x) − log π_ref(y|x)), summed
over the completion's tokens (and the token that ends it), and Δ = r(chosen) − r(rejected) / β. The losses, as
``trl``'s ``DPOTrainer`` computes them (checked against it in the tests):

* ``sigmoid`` (DPO): −log σ(β Δ);
* ``ipo`` (Azar et al., 2023): (Δ̄ − 1 / 2β)², Δ̄ the difference of the per-token mean log-ratios;
* ``robust`` (rDPO, Chowdhury et al., 2024: labels flipped with probability ε = ``label_smoothing``):
  (−(1−ε) log σ(β Δ) + ε log σ(−β Δ)) / (1 − 2ε);
* ``cdpo`` (conservative DPO, Mitchell, 2023; older trl's ``sigmoid`` with ``label_smoothing``, which trl 1.x
  dropped): −(1−ε) log σ(β Δ) − ε log σ(−β Δ), the cross-entropy against labels right with probability 1 − ε.
  DPO's and rDPO's losses keep falling as a margin widens; this one's is least at β Δ = log((1 − ε) / ε), so its
  optimum is the reference reweighted by a finite factor, not pushed without end.

``rpo_alpha`` > 0 adds α times the mean negative log-likelihood of the chosen answers' tokens (RPO, Pang et al.,
2024; trl's ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, α]``): DPO alone can raise the margin by
lowering both answers, moving mass to text neither of them resembles; the likelihood term keeps it on the chosen.

The reference is frozen, so each answer's reference log-probability is computed once and remembered (trl's
``precompute_ref_log_probs``, done lazily): after the first epoch a step runs the policy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError
from glmlab.finetune.examples import Examples, Pair, encode_pairs, length_ordered, read_jsonl_objects
from glmlab.generation.chat import CHAT_ROLES, ChatTemplate

LOSSES = ("sigmoid", "ipo", "robust", "cdpo")
FORMAT_HINT = ('write one {"prompt": ..., "chosen": ..., "rejected": ...} per line (texts, or a list of messages for '
               'the prompt and [{"role": "assistant", "content": ...}] for each answer)')


@dataclass
class Preference:
    """A prompt (text, or messages for the chat template) and two answers, the first preferred."""

    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} is not a list of messages", FORMAT_HINT)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a role of {', '.join(CHAT_ROLES)} and text content",
                            FORMAT_HINT)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: Any, where: str) -> str:
    """An answer: a text, or a list holding one assistant message (trl's conversational form)."""
    if isinstance(value, list):
        messages = _messages(value, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{where} must hold one assistant message", FORMAT_HINT)
        value = messages[0]["content"]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} is missing or empty", FORMAT_HINT)
    return value


def read_preferences(path: str | Path) -> list[Preference]:
    """Preference pairs from JSONL, refusing a missing prompt, an empty answer and a pair whose answers are equal
    (it carries no preference)."""
    path = Path(path)
    pairs = []
    for number, row in read_jsonl_objects(path):
        where = f"{path}, line {number}"
        if "prompt" not in row:
            raise DataError(f"{where}: no prompt (fields: {', '.join(row)})", FORMAT_HINT)
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = _messages(prompt, f"{where}: prompt")
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: the prompt is neither text nor a list of messages", FORMAT_HINT)
        chosen, rejected = _answer(row.get("chosen"), f"{where}: chosen"), _answer(row.get("rejected"),
                                                                                   f"{where}: rejected")
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are the same answer, so the pair prefers nothing",
                            "drop the pair, or give two different answers")
        pairs.append(Preference(prompt, chosen, rejected))
    if not pairs:
        raise DataError(f"{path} holds no preference pairs", FORMAT_HINT)
    return pairs


@dataclass
class PreferenceExamples:
    """Encoded pairs: the chosen and the rejected sequences as sft examples (targets on the answer only)."""

    chosen: Examples
    rejected: Examples

    def __post_init__(self) -> None:
        self.lengths = np.maximum(self.chosen.lengths, self.rejected.lengths)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def truncated(self) -> int:
        return max(self.chosen.truncated, self.rejected.truncated)

    def collate(self, rows: np.ndarray | list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (2B, T): the chosen rows, then the rejected ones, right-padded to one width."""
        (xc, yc), (xr, yr) = self.chosen.collate(rows, pad_id), self.rejected.collate(rows, pad_id)
        width = max(xc.size(1), xr.size(1))
        x = torch.cat([F.pad(xc, (0, width - xc.size(1)), value=pad_id), F.pad(xr, (0, width - xr.size(1)),
                                                                               value=pad_id)])
        y = torch.cat([F.pad(yc, (0, width - yc.size(1)), value=IGNORE_INDEX),
                       F.pad(yr, (0, width - yr.size(1)), value=IGNORE_INDEX)])
        return x, y

    def batches(self, batch_size: int, pad_id: int):
        """Every pair once, in length order; yields (row indices, x, y)."""
        return length_ordered(self, batch_size, pad_id)


def encode_preferences(tokenizer: Tokenizer, template: ChatTemplate | None, pairs: list[Preference], max_len: int,
                       bos: bool, end_ids: list[int]) -> PreferenceExamples:
    """Each answer after its prompt, as sft encodes a pair: a text prompt as is, a conversation rendered by
    ``template`` with the assistant's opening; each answer closed by the template's end of turn (``end_ids``) or
    ``<eos>``."""
    def prompt_text(p: Preference) -> str:
        if isinstance(p.prompt, str):
            return p.prompt
        if template is None:
            raise DataError("a prompt given as messages needs the run's chat template", "give the prompt as text")
        return template.render(p.prompt, add_generation_prompt=True)

    prompts = [prompt_text(p) for p in pairs]
    end = end_ids[0] if end_ids else None
    chosen = encode_pairs(tokenizer, [Pair(t, p.chosen) for t, p in zip(prompts, pairs, strict=True)], max_len, bos,
                          end_id=end)
    rejected = encode_pairs(tokenizer, [Pair(t, p.rejected) for t, p in zip(prompts, pairs, strict=True)], max_len,
                            bos, end_id=end)
    return PreferenceExamples(chosen, rejected)


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's scored targets, and how many there are."""
    return target_logps(model(x).float(), y)


def target_logps(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` from logits (B, T, vocab) already computed."""
    scored = y != IGNORE_INDEX
    logp = torch.gather(F.log_softmax(logits, -1), 2, y.clamp(min=0)[..., None])[..., 0]
    return (logp * scored).sum(1), scored.sum(1)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards β (log π − log π_ref) of the chosen and rejected answers, from
    summed log-probabilities (``*_tokens``: the answers' token counts, which IPO averages over)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss averages over the answers' tokens: give their counts")
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    elif loss == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss == "cdpo":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    else:
        raise ValueError(f"unknown preference loss {loss!r}; use one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's likelihood term: the mean negative log-probability of the chosen answers' tokens (over all tokens of
    the batch, as trl averages it)."""
    return -chosen.sum() / chosen_tokens.sum().clamp(min=1)


class ReferenceCache:
    """Summed log-probabilities of scored answers under a frozen model, remembered by row content: a row is its
    tokens up to its last scored target (padding on the right cannot change them under causal attention)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.known: dict[bytes, float] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scored = (y != IGNORE_INDEX).cpu()
        ends = torch.where(scored.any(1), scored.shape[1] - scored.flip(1).int().argmax(1), 0).tolist()
        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        keys = [xs[i, :n].tobytes() + b"|" + ys[i, :n].tobytes() for i, n in enumerate(ends)]
        todo: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self.known:
                todo.setdefault(key, i)
        unique = list(todo.values())
        if unique:
            width = max(max(ends[i] for i in unique), 1)
            rows = torch.tensor(unique, device=x.device)
            logps, _ = sequence_logps(self.model, x[rows, :width], y[rows, :width])
            for i, value in zip(unique, logps.tolist(), strict=True):
                self.known[keys[i]] = value
        return torch.tensor([self.known[k] for k in keys], dtype=torch.float32, device=x.device)


class PreferenceObjective(nn.Module):
    """``forward(x, y)`` → the mean preference loss of a batch of pairs (chosen rows, then rejected rows) for the
    policy, against the frozen ``reference`` (plus ``rpo_alpha`` times the chosen answers' NLL); the batch's
    rewards, margins and accuracy go to the policy's ``stats`` (averaged into each training record)."""

    def __init__(self, policy: nn.Module, reference: nn.Module, beta: float, loss: str,
                 label_smoothing: float, rpo_alpha: float = 0.0) -> None:
        super().__init__()
        self.model, self.reference = policy, reference.eval().requires_grad_(False)
        self.reference_logps = ReferenceCache(self.reference)
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss, label_smoothing, rpo_alpha

    def pair_losses(self, x: torch.Tensor, y: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses, the chosen and rejected rewards, and the chosen answers' summed log-probabilities and
        token counts (RPO's term)."""
        logps, tokens = sequence_logps(self.model, x, y)
        ref_logps = self.reference_logps(x, y).to(logps.dtype)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses, r_chosen, r_rejected = preference_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                       self.loss_type, self.label_smoothing, chosen_tokens,
                                                       rejected_tokens)
        return losses, r_chosen, r_rejected, chosen, chosen_tokens

    def total(self, losses: torch.Tensor, chosen: torch.Tensor, chosen_tokens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of pairs (their mean preference loss, plus ``rpo_alpha`` times the chosen answers' NLL) and
        that NLL (None without RPO): a batch's in training, a whole split's in evaluation."""
        if not self.rpo_alpha:
            return losses.mean(), None
        nll = chosen_nll(chosen, chosen_tokens)
        return losses.mean() + self.rpo_alpha * nll, nll

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses, r_chosen, r_rejected, chosen, chosen_tokens = self.pair_losses(x, y)
        self.model.stats = reward_figures(r_chosen, r_rejected)
        loss, nll = self.total(losses, chosen, chosen_tokens)
        if nll is not None:
            self.model.stats["chosen_nll"] = nll.detach()
        return loss


def reward_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logged preference figures of a batch: mean rewards, margin and accuracy (chosen above rejected)."""
    return {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(), "reward_accuracy": (chosen > rejected).float().mean()}
