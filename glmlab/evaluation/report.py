"""`glmlab eval`: score a run on a split of its data directory, or on a text file."""

from __future__ import annotations

from pathlib import Path

from glmlab.data.corpus import read_corpus
from glmlab.data.dataset import open_data_dir
from glmlab.data.prepare import encode_documents
from glmlab.errors import GlmlabError
from glmlab.evaluation.likelihood import LikelihoodReport, likelihood_report, sum_nll
from glmlab.runs import load_run
from glmlab.runtime import select_device


def evaluate_run(run_dir: str | Path, split: str | None = None, file: str | Path | None = None,
                 data_dir: str | Path | None = None, stride: int | None = None, batch_size: int = 16,
                 checkpoint: str = "best", device: str = "auto") -> tuple[LikelihoodReport, str]:
    """Score every token of ``split`` (default val) or of ``file``; returns the report and what was scored."""
    if batch_size < 1:
        raise GlmlabError(f"--batch-size {batch_size} must be at least 1")
    dev = select_device(device)
    run = load_run(run_dir, checkpoint=checkpoint, device=dev)
    tok = run.tokenizer
    if file is not None:
        corpus = read_corpus([file])
        tokens = encode_documents(tok, corpus.documents)
        chars = corpus.characters
        num_bytes = sum(len(d.encode("utf-8")) for d in corpus.documents)
        label = str(file)
    else:
        split = split or "val"
        directory = data_dir or run.raw_config.get("data", {}).get("dir")
        if not directory or not Path(directory).is_dir():
            raise GlmlabError(f"the run's data directory {directory} is not there",
                              "pass --data DATA_DIR, or score a text file with --file F")
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
    nll, count = sum_nll(run.model, tokens, tok.eos_id, stride=stride, batch_size=batch_size, device=dev)
    return likelihood_report(nll, count, chars, num_bytes), label
