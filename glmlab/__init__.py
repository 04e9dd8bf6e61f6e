"""glmlab: train, sample, measure, fine-tune and serve generative language models.

The library API in one line: ``lm = glmlab.load("runs/shakespeare-char"); lm.generate("ROMEO:")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmlab.version import __version__

__all__ = ["load", "__version__"]

if TYPE_CHECKING:
    from glmlab.runs import LoadedRun


def load(run_dir: Any, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
    """Load a run directory: a model and tokenizer ready to generate (see :class:`glmlab.runs.LoadedRun`)."""
    from glmlab.runs import load_run

    return load_run(run_dir, checkpoint=checkpoint, device=device)
