"""Fine-tuning pre-trained runs on downstream tasks: classification (``glmlab finetune classify``, ``glmlab
predict``) and supervised completion (``glmlab finetune sft``), with a before/after report."""

from typing import Any

__all__ = ["Classifier", "Prediction", "load_classifier"]


def __getattr__(name: str) -> Any:  # lazy: the CLI imports this package without loading torch
    if name in __all__:
        from glmlab.finetune import predict

        return vars(predict)[name]
    raise AttributeError(name)
