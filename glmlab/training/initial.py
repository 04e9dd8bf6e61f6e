"""Starting a run from weights that already exist (``glmlab train --init``): continued pre-training.

An :class:`InitialWeights` is a model section, its weights and its tokenizer — read from a glmlab run here, or
from a Hugging Face GPT-2 or BERT directory by :mod:`glmlab.interop.hf_gpt2` (the CLI picks by what the directory
holds).
The new run takes the source's architecture: :func:`init_config` builds its config from the source's model
section and refuses a change to it, apart from what does not change the function the weights compute —
dropout, the family's resumable keys — and a shorter context, which keeps the first rows of a learnt position
table (:func:`load_initial`). The data must be encoded with the source's tokenizer (``glmlab prepare
--tokenizer-from``); the task checks that.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from glmlab.config import RunConfig, parse_overrides, resolve_config
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import ConfigError, DataError
from glmlab.generation.chat import TEMPLATE_FILE
from glmlab.models import get_family
from glmlab.runs import load_run

FREE_KEYS = ("dropout",)  # model keys an initialised run may set: they do not change what the weights compute


@dataclass
class InitialWeights:
    """Where a run starts: the source's model section, its weights (by parameter name) and its tokenizer."""

    source: str  # the path given to --init
    kind: str  # "run" (a glmlab run) or "hf" (a Hugging Face directory)
    model: dict[str, Any]
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None = None  # the source's own (a run's chat_template.jinja, an HF tokenizer config's)

    def describe(self) -> dict[str, Any]:
        """What config.json records of it."""
        return {"from": str(Path(self.source).resolve()), "kind": self.kind}


def from_run(run_dir: str | Path, checkpoint: str = "best") -> InitialWeights:
    """A glmlab run's weights (``checkpoint``: best, last or step-N; adapters merged) as a starting point."""
    run = load_run(run_dir, checkpoint)
    state = {name: tensor.detach().clone() for name, tensor in run.model.state_dict().items()}
    template = Path(run_dir) / TEMPLATE_FILE
    return InitialWeights(str(run_dir), "run", dataclasses.asdict(run.config.model), state, run.tokenizer,
                          template.read_text(encoding="utf-8") if template.is_file() else None)


def init_config(init: InitialWeights, base: dict[str, Any] | None, overrides: Sequence[str]) -> RunConfig:
    """The config of a run that starts from ``init``: its model section, then the user's (``base``: a YAML file's
    sections; ``overrides``), which may set train keys freely but model keys only where they leave the
    architecture as it is (``FREE_KEYS``, the family's resumable keys, a smaller ``block_size``)."""
    base = dict(base or {})
    asked = {**(base.pop("model", None) or {}), **parse_overrides(overrides).get("model", {})}
    source = resolve_config({"model": init.model})
    if str(asked.get("family", source.model.family)) != source.model.family:
        raise ConfigError(f"a run started from {init.source} is a {source.model.family}; the config asks for "
                          f"model.family={asked['family']}", "drop model.family, or train a new model without --init")
    config = resolve_config({"model": {**init.model, **asked}, **base},
                            [o for o in overrides if not o.strip().startswith("model.")])
    free = set(FREE_KEYS) | set(get_family(source.model.family).resumable)
    before, after = dataclasses.asdict(source.model), dataclasses.asdict(config.model)
    changed = [key for key in asked if key not in free and before.get(key) != after.get(key)
               and not (key == "block_size" and after[key] < before[key])]
    if changed:
        listed = ", ".join(f"model.{key}={after.get(key, asked[key])!r} (the source has {before.get(key)!r})"
                           for key in changed)
        raise ConfigError(f"a run started from {init.source} keeps its architecture; the config changes {listed}",
                          "drop those keys (model.dropout and a smaller model.block_size may change), or train "
                          "a new model without --init")
    return config


def check_tokenizer(init: InitialWeights, data_tokenizer: Tokenizer, data_dir: Path) -> None:
    """Refuse data encoded with a tokenizer other than the source's: its ids would mean other tokens."""
    same = json.loads(init.tokenizer.hf.to_str()) == json.loads(data_tokenizer.hf.to_str()) and \
        init.tokenizer.role_ids == data_tokenizer.role_ids
    if not same:
        raise DataError(f"{data_dir} was encoded with another tokenizer than {init.source}'s",
                        f"prepare the data with it: glmlab prepare INPUT --tokenizer-from {init.source} --out DATA_DIR")


def load_initial(model: nn.Module, init: InitialWeights) -> None:
    """The source's weights into ``model`` (built from :func:`init_config`'s config): every parameter and buffer
    by name; a position table of a smaller context keeps its first rows."""
    target = model.state_dict()
    state = {}
    for name, tensor in init.state.items():
        want = target.get(name)
        if want is not None and want.shape != tensor.shape and want.shape[1:] == tensor.shape[1:] \
                and 0 < want.shape[0] < tensor.shape[0]:
            tensor = tensor[: want.shape[0]]  # positions 0..block_size-1 of the source's table
        state[name] = tensor
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape the config does not give
        raise ConfigError(f"the weights of {init.source} do not fit the model "
                          f"({str(exc).splitlines()[-1].strip()})", "keep the source's architecture") from None
    tied = {name for name in missing if name.endswith("lm_head.weight")}  # shares the token embeddings
    if set(missing) - tied or unexpected:
        raise ConfigError(f"the weights of {init.source} do not fit the model "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})",
                          "start from a run or checkpoint of the same family and shape")
