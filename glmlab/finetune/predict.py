"""A fine-tuned classifier run, loaded for prediction: labels with probabilities for new texts, and metrics
when the texts come with labels (``glmlab predict``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError, RunDirError
from glmlab.finetune.classifier import BackboneClassifier, SequenceClassifier, padding_of
from glmlab.finetune.cloze import Cloze, ClozeClassifier
from glmlab.finetune.examples import Examples, encode_texts, read_labelled, sort_labels
from glmlab.finetune.metrics import classification_metrics
from glmlab.models import build_model
from glmlab.models.lora import merge_lora
from glmlab.runs import TOKENIZER, LoadSpec, add_adapters, load_weights, read_run_config, weights_path


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]  # every label's probability, in the run's label order


@dataclass
class Classifier:
    """A classifier run: ``predict(texts)``; ``truncated`` counts the texts of the last call cut to the context,
    ``unknown`` says how many of their tokens were <unk>."""

    model: BackboneClassifier
    tokenizer: Tokenizer
    labels: list[str]
    bos: bool
    run_dir: Path
    truncated: int = 0
    cloze: Cloze | None = None  # a cloze classifier's pattern and verbalizer
    unknown: str | None = None  # the last call's note on characters (words) read as <unk>, if any

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 64) -> list[Prediction]:
        encode = self.cloze.encode if self.cloze is not None else encode_texts
        ids, self.truncated = encode(self.tokenizer, texts, self.model.block_size, self.bos)
        self.unknown = self.tokenizer.unknown_note(ids, texts, "texts")
        probabilities = np.zeros((len(texts), len(self.labels)))
        device = next(self.model.parameters()).device
        for rows, x, _ in Examples(ids, labels=[0] * len(ids)).batches(batch_size, padding_of(self.tokenizer)[0]):
            probabilities[rows] = torch.softmax(self.model(x.to(device)).float(), -1).cpu().numpy()
        return [Prediction(self.labels[int(p.argmax())], dict(zip(self.labels, p.tolist(), strict=True)))
                for p in probabilities]

    def evaluate(self, texts: list[str], labels: list[str], batch_size: int = 64) -> tuple[list[Prediction], dict]:
        """Predictions and accuracy / macro-F1 / confusion matrix against ``labels``."""
        unseen = sort_labels(set(labels) - set(self.labels))
        if unseen:
            raise DataError(f"labels the model never saw in training: {', '.join(map(repr, unseen[:5]))} "
                            f"(it knows {', '.join(map(repr, self.labels))})",
                            "fix the labels, or fine-tune a model on data that has them")
        predictions = self.predict(texts, batch_size)
        index = {label: i for i, label in enumerate(self.labels)}
        truth = np.array([index[label] for label in labels])
        predicted = np.array([index[p.label] for p in predictions])
        return predictions, classification_metrics(truth, predicted, len(self.labels))


def load_classifier(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> Classifier:
    """Load a run written by ``glmlab finetune classify`` (LoRA updates merged into the weights)."""
    run_dir = Path(run_dir)
    config, raw = read_run_config(run_dir)
    spec = LoadSpec.of(raw)
    if spec.head != "classifier":
        raise RunDirError(f"{run_dir} is not a classifier (it was not written by glmlab finetune classify)",
                          "fine-tune one with: glmlab finetune classify --init RUN_DIR --train F --val F --out DIR")
    task: dict[str, Any] = raw["finetune"]
    tokenizer = Tokenizer.from_file(run_dir / TOKENIZER, raw.get("special_tokens"))
    backbone = build_model(config.model, sentences=spec.sentence_level)
    add_adapters(backbone, spec)
    labels = list(task["labels"])
    cloze = Cloze.parse(task["pattern"], task["verbalizer"]) if task.get("pattern") else None
    if cloze is not None:
        model: BackboneClassifier = ClozeClassifier(backbone, cloze.word_ids(tokenizer, labels))
    else:
        pad_id, pad_ends_texts = padding_of(tokenizer)
        model = SequenceClassifier(backbone, len(labels), task["pooling"], pad_id, frozen=task.get("mode") == "probe",
                                   pad_ends_texts=pad_ends_texts)
    load_weights(model, weights_path(run_dir, checkpoint))
    merge_lora(model)
    model.to(device).eval()
    return Classifier(model, tokenizer, labels, bool(task.get("bos")), run_dir, cloze=cloze)


def predict_file(classifier: Classifier, path: str | Path, text_column: str | None = None,
                 label_column: str = "label", batch_size: int = 64) -> tuple[list[str], list[Prediction], dict | None]:
    """Texts of a file, their predictions, and metrics when the file has a label column."""
    data = read_labelled(path, text_column, label_column, labels_required=False)
    if data.labels is None:
        return data.texts, classifier.predict(data.texts, batch_size), None
    predictions, metrics = classifier.evaluate(data.texts, data.labels, batch_size)
    return data.texts, predictions, metrics
