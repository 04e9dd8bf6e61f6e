"""`glmlab eval`: score a run on a split of its data directory, or on a text file.

A run trained on windows of the token stream (`gpt`, or `lstm` with windows) is scored in context
windows (:class:`~glmlab.evaluation.likelihood.LikelihoodReport`). A run trained on whole sentences
(`vae`, or any family with ``train.batching=sentences``) is scored sentence by sentence
(:class:`SentenceReport`), with the same token accounting for every family, so an LSTM's exact NLL and a
VAE's importance-weighted NLL sit in one table: NLL per sentence is summed over its tokens including
``<eos>``, and PPL = exp(total NLL / total tokens including ``<eos>``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from glmlab.data.corpus import read_corpus
from glmlab.data.dataset import IGNORE_INDEX, open_data_dir
from glmlab.data.prepare import encode_documents
from glmlab.data.sentences import Sentences, find_sentences, sentence_batches
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.evaluation.latent import (
    ACTIVE_UNIT_THRESHOLD,
    active_units,
    importance_weighted_nll,
    mutual_information,
)
from glmlab.evaluation.likelihood import (
    PSEUDO_NOTE,
    LikelihoodReport,
    likelihood_report,
    sum_nll,
    sum_nll_batches,
)
from glmlab.runs import LoadedRun, load_run
from glmlab.runtime import select_device

IW_SAMPLES = 500
BLEU_SENTENCES = 500
IW_CHUNK_ELEMENTS = 1 << 25  # logits per importance-sampling chunk (k * batch * length * vocab): 128 MiB of float32
DECODE_ROWS = 256  # sentences reconstructed per generation call


@dataclass
class SentenceReport:
    """Sentence-level scores of a run. NLLs are in nats; "per sentence" sums a sentence's tokens including
    ``<eos>``; ``perplexity`` = exp(nll / tokens) of the NLL named by ``nll_kind``. The latent fields are
    None for a model without a latent variable."""

    target: str
    family: str
    sentences: int
    tokens: int  # targets scored: words + <eos>, padding excluded
    truncated: int  # sentences longer than the model's block size, cut to block_size - 1 targets
    nll_kind: str  # "exact", "importance-weighted" (an upper bound that approaches the NLL as k grows), or
    # "pseudo" (a masked LM's pseudo-log-likelihood: each token given all the others; not an NLL)
    nll: float  # total over every sentence
    nll_per_sentence: float
    nll_per_token: float
    perplexity: float
    seed: int
    iw_samples: int | None = None
    elbo_nll: float | None = None  # -ELBO, total (reconstruction estimated from the same k samples, KL closed form)
    elbo_nll_per_sentence: float | None = None
    elbo_nll_per_token: float | None = None
    kl_per_sentence: float | None = None  # mean KL(q(z|x) || p(z)), closed form
    mutual_info: float | None = None  # I(x; z) in nats, q(z) estimated over the evaluation sentences
    active_units: int | None = None
    latent_dim: int | None = None
    active_unit_threshold: float | None = None
    bleu: float | None = None  # corpus BLEU-4 x 100 of greedy reconstructions from the posterior mean
    bleu_sentences: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """One block: what was scored, then one labelled line per metric."""
        lines = [f"{self.target}: {self.family}, {self.sentences:,} sentences, {self.tokens:,} tokens "
                 f"(<eos> included), seed {self.seed}"]
        if self.truncated:
            lines.append(f"  note: {self.truncated:,} sentences longer than the model's block size were cut")
        row = "  {:<34} {:>10.3f} nats/sentence {:>8.4f} nats/token"
        if self.nll_kind == "exact":
            lines.append(row.format("NLL (exact)", self.nll_per_sentence, self.nll_per_token))
        elif self.nll_kind == "pseudo":
            lines.append(row.format("PLL (pseudo-NLL, not comparable)", self.nll_per_sentence, self.nll_per_token))
        else:
            lines.append(row.format(f"NLL (importance-weighted, k={self.iw_samples})", self.nll_per_sentence,
                                    self.nll_per_token))
            lines.append(row.format("ELBO-NLL (-ELBO, upper bound)", self.elbo_nll_per_sentence,
                                    self.elbo_nll_per_token))
        source = {"exact": "the exact NLL per token", "pseudo": f"the PLL per token; {PSEUDO_NOTE}"}.get(
            self.nll_kind, "the IW NLL per token; it includes the KL")
        lines.append(f"  {'PPL':<34} {self.perplexity:>10.3f} (exp of {source})")
        if self.latent_dim is not None:
            lines.append(f"  {'KL(q(z|x) || p(z))':<34} {self.kl_per_sentence:>10.3f} nats/sentence")
            lines.append(f"  {'mutual information I(x;z)':<34} {self.mutual_info:>10.3f} nats (q(z) estimated over "
                         f"the {self.sentences:,} evaluation sentences)")
            lines.append(f"  {'active units':<34} {f'{self.active_units} / {self.latent_dim}':>10} "
                         f"(Var_x E[z|x] > {self.active_unit_threshold:g})")
            if self.bleu is not None:
                lines.append(f"  {'reconstruction BLEU-4':<34} {self.bleu:>10.2f} (greedy from the posterior mean, "
                             f"first {self.bleu_sentences:,} sentences)")
        return "\n".join(lines)


def is_sentence_run(run: LoadedRun) -> bool:
    """Whether a run is scored sentence by sentence: its model reads sentences (a family that trains on nothing
    else, such as vae, or a run trained with ``train.batching=sentences``)."""
    return run.model.traits.sentence_level


def evaluate_run(run_dir: str | Path, split: str | None = None, file: str | Path | None = None,
                 data_dir: str | Path | None = None, stride: int | None = None, batch_size: int = 16,
                 checkpoint: str = "best", device: str = "auto", samples: int | None = None,
                 bleu_sentences: int = BLEU_SENTENCES, seed: int = 0, notes: list[str] | None = None,
                 ) -> tuple[LikelihoodReport | SentenceReport, str]:
    """Score every token of ``split`` (default val) or of ``file``; returns the report and what was scored.

    Sentence runs (see :func:`is_sentence_run`) give a :class:`SentenceReport` (``samples``,
    ``bleu_sentences`` and ``seed`` apply to latent-variable models); the others a windowed
    :class:`LikelihoodReport`.
    """
    if batch_size < 1:
        raise GlmlabError(f"--batch-size {batch_size} must be at least 1")
    if samples is not None and samples < 1:
        raise GlmlabError(f"--samples {samples}: the importance-weighted bound needs at least 1 sample of z",
                          f"use --samples {IW_SAMPLES} (the default) or another positive number")
    if bleu_sentences < 0:
        raise GlmlabError(f"--bleu-sentences {bleu_sentences} is negative", "use 0 to skip BLEU, or a positive number")
    dev = select_device(device)
    run = load_run(run_dir, checkpoint=checkpoint, device=dev)
    tok = run.tokenizer
    sentence_mode = is_sentence_run(run)
    if sentence_mode and stride is not None:
        raise GlmlabError(f"--stride applies to window evaluation, and {run_dir} scores whole sentences",
                          "drop --stride")
    if file is not None:
        corpus = read_corpus([file], sentences=sentence_mode)
        tokens = encode_documents(tok, corpus.documents)
        ends = np.flatnonzero(tokens == tok.eos_id) + 1  # each document is followed by <eos>
        unknown = tok.unknown_note(np.split(tokens, ends)[:len(corpus.documents)], corpus.documents,
                                   "documents of the file")
        if unknown is not None and notes is not None:  # scored as <unk>, as prepare's data are: said, not hidden
            notes.append(unknown)
        chars = corpus.characters
        num_bytes = sum(len(d.encode("utf-8")) for d in corpus.documents)
        label = str(file)
    else:
        split = split or "val"
        directory = data_dir or run.raw_config.get("data", {}).get("dir")
        if not directory or not Path(directory).is_dir():
            where = f"the run's data directory {directory} is not there" if directory else \
                "the run does not name a data directory"
            raise GlmlabError(where, "pass --data DATA_DIR, or score a text file with --file F")
        data = open_data_dir(directory)
        if data.tokenizer.hf.to_str() != tok.hf.to_str():
            raise GlmlabError(f"{directory} was tokenized with a different tokenizer than {run_dir}",
                              "pass the data directory the run was trained on, or score raw text with --file F")
        tokens = data.tokens(split)
        if len(tokens) == 0:
            raise GlmlabError(f"the {split} split of {directory} is empty", "score another split or --file F")
        stats = data.split_stats(split)
        chars, num_bytes = stats["characters"], stats["bytes"]
        label = f"{split} split of {directory}"
    if sentence_mode:
        if tok.bos_id is None or tok.pad_id is None:
            raise GlmlabError(f"the tokenizer of {run_dir} has no <bos> or <pad> token, which sentence scoring needs",
                              "evaluate a run trained on data from glmlab prepare (its tokenizers have both)")
        sentences = find_sentences(tokens, tok.eos_id, run.model.block_size)
        report = evaluate_sentences(run.model, tok, sentences, label, batch_size=batch_size,
                                    samples=IW_SAMPLES if samples is None else samples,
                                    bleu_sentences=bleu_sentences, seed=seed, device=dev)
        return report, label
    nll, count = sum_nll(run.model, tokens, tok.eos_id, stride=stride, batch_size=batch_size, device=dev)
    kind = "pll" if run.model.traits.pseudo_likelihood else "nll"
    return likelihood_report(nll, count, chars, num_bytes, kind), label


def evaluate_sentences(model: nn.Module, tokenizer: Tokenizer, sentences: Sentences, target: str = "sentences",
                       batch_size: int = 16, samples: int = IW_SAMPLES, bleu_sentences: int = BLEU_SENTENCES,
                       seed: int = 0, device: torch.device | str = "cpu") -> SentenceReport:
    """Score every sentence once. A model with a latent variable (``traits.latent_dim``) gets the
    importance-weighted NLL with ``samples`` z's per sentence, the ELBO, KL, mutual information, active
    units and reconstruction BLEU on the first ``bleu_sentences`` sentences (0 = skip); any other
    model its exact NLL. Deterministic for a given ``seed`` and ``batch_size``."""
    if len(sentences) == 0:
        raise GlmlabError(f"{target} holds no sentences", "score a split or file with text in it")
    if samples < 1:
        raise GlmlabError(f"{samples} importance samples", "use at least 1")
    family = model.traits.family
    batches = sentence_batches(sentences, batch_size, tokenizer.bos_id, tokenizer.pad_id)
    if not model.traits.latent_dim:
        total, count = sum_nll_batches(model, batches, device=device)
        return _with_nll(dict(target=target, family=family, sentences=len(sentences), truncated=sentences.truncated,
                              seed=seed), "pseudo" if model.traits.pseudo_likelihood else "exact", total, count)
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        iw_total, elbo_total, count, mus, logvars = 0.0, 0.0, 0, [], []
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            chunk = max(1, min(samples, IW_CHUNK_ELEMENTS // (y.numel() * model.config.vocab_size)))
            with torch.no_grad():
                mu, logvar = model.encode(y)
            iw, elbo = importance_weighted_nll(model, x, y, samples=samples, chunk=chunk, generator=generator,
                                               posterior=(mu, logvar))
            iw_total += float(iw.double().sum())
            elbo_total += float(elbo.double().sum())
            count += int((y != IGNORE_INDEX).sum())
            mus.append(mu.float())
            logvars.append(logvar.float())
        mu, logvar = torch.cat(mus), torch.cat(logvars)
        bleu, bleu_count = (None, None) if bleu_sentences == 0 else reconstruction_bleu(
            model, tokenizer, sentences, bleu_sentences, batch_size, device)
    finally:
        model.train(was_training)
    mi_generator = torch.Generator(device=mu.device).manual_seed(seed)
    n = len(sentences)
    report = _with_nll(dict(target=target, family=family, sentences=n, truncated=sentences.truncated, seed=seed),
                       "importance-weighted", iw_total, count)
    report.iw_samples = samples
    report.elbo_nll, report.elbo_nll_per_sentence, report.elbo_nll_per_token = elbo_total, elbo_total / n, \
        elbo_total / max(count, 1)
    with torch.no_grad():  # closed form under N(0, I), Monte Carlo under a mixture prior
        kl = model.kl_divergence(mu, logvar, generator=torch.Generator(device=mu.device).manual_seed(seed))
    report.kl_per_sentence = float(kl.mean())
    report.mutual_info = mutual_information(mu, logvar, mi_generator)
    report.active_units, report.latent_dim = active_units(mu), mu.size(1)
    report.active_unit_threshold = ACTIVE_UNIT_THRESHOLD
    report.bleu, report.bleu_sentences = bleu, bleu_count
    return report


def _with_nll(fields: dict[str, Any], kind: str, total: float, tokens: int) -> SentenceReport:
    per_token = total / max(tokens, 1)
    return SentenceReport(**fields, tokens=tokens, nll_kind=kind, nll=total,
                          nll_per_sentence=total / fields["sentences"], nll_per_token=per_token,
                          perplexity=math.exp(min(per_token, 700.0)))


def sentence_words(tokenizer: Tokenizer, ids: list[int] | np.ndarray) -> list[str]:
    """The words of a sentence given as token ids: specials other than ``<unk>`` dropped, the rest
    decoded (``<unk>`` spelled out, as PTB writes it) and split on whitespace."""
    skip = set(tokenizer.role_ids.values()) - {tokenizer.unk_id}  # every special token but <unk>
    kept = [int(i) for i in ids if int(i) not in skip]
    return tokenizer.decode(kept, skip_special_tokens=False).split()


@torch.no_grad()
def reconstruction_bleu(model: nn.Module, tokenizer: Tokenizer, sentences: Sentences, limit: int,
                        batch_size: int = 16, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Corpus BLEU-4 (x 100; nltk, smoothing method 1, word tokens) of greedy reconstructions from the
    posterior mean against the first ``limit`` sentences; returns it and the number of sentences used."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    from glmlab.generation.generate import GenerationSettings, generate_batch

    references, mus = [], []
    for _, y in sentence_batches(sentences, batch_size, tokenizer.bos_id, tokenizer.pad_id, limit=limit):
        mu, _ = model.encode(y.to(device))
        mus.append(mu)
        references.extend([sentence_words(tokenizer, row[row != IGNORE_INDEX].tolist())] for row in y)
    mu = torch.cat(mus)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=model.block_size - 1)
    hypotheses: list[list[str]] = []
    for begin in range(0, mu.size(0), DECODE_ROWS):
        z = mu[begin:begin + DECODE_ROWS]
        rows = generate_batch(model.given(z), tokenizer, [""] * z.size(0), settings)
        hypotheses.extend(sentence_words(tokenizer, r[0].token_ids) for r in rows)
    if not any(hypotheses):
        return 0.0, len(hypotheses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = corpus_bleu(references, hypotheses, smoothing_function=SmoothingFunction().method1)
    return 100.0 * float(score), len(hypotheses)
