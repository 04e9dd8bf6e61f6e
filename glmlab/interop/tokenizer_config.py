"""A run's tokenizer as Hugging Face tools describe one (``tokenizer_config.json``): written by ``export-hf`` and
served at ``/tokenizer_info`` (vLLM's endpoint, which lm-evaluation-harness's ``remote`` tokenizer reads).

``bos_token`` is the start token the model read: ``<bos>`` before each sentence of a sentence-level run, and
``<eos>`` — the document separator — before each document of running text. Tools that prepend the declared start
token (lm-evaluation-harness prefixes empty contexts and rolling windows with it) then condition the model as it
was trained.
"""

from __future__ import annotations

from typing import Any

from glmlab.data.tokenizer import Tokenizer
from glmlab.generation.chat import PLAIN_TEMPLATE
from glmlab.generation.engine import start_token_id
from glmlab.models.contract import LanguageModel

HF_ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")  # the roles transformers' tokenizers name


def tokenizer_config(model: LanguageModel, tokenizer: Tokenizer, chat_template: str = PLAIN_TEMPLATE) -> dict[str, Any]:
    """``tokenizer_config.json`` for the run's tokenizer (special tokens by role, the model's context, the run's
    chat template; no cleanup of spaces, so decoding gives back the text)."""
    names = {**tokenizer.special_tokens, "bos": tokenizer.hf.id_to_token(start_token_id(model, tokenizer))}
    named = {f"{role}_token": token for role, token in names.items() if role in HF_ROLES}
    others = [token for role, token in names.items() if role not in HF_ROLES]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.block_size,
            "clean_up_tokenization_spaces": False, **named,
            **({"additional_special_tokens": others} if others else {}), "chat_template": chat_template}
