"""A `bert` run as a Hugging Face ``BertForMaskedLM`` directory: ``glmlab export-hf`` for masked language models.

glmlab's `bert` is built to map onto BERT by plain copies: post-LN blocks (``h.{i}.ln_1`` is BERT's
``attention.output.LayerNorm``, ``h.{i}.ln_2`` its ``output.LayerNorm``), exact GELU, learned positions
(``max_position_embeddings`` = ``block_size``) and BERT's prediction head tied to the word embeddings. Only the
layouts differ: the fused q/k/v projection is stored as GPT-2's ``Conv1D`` ``(in, 3 * out)``, so it is split
and transposed into ``query`` / ``key`` / ``value`` (``nn.Linear``, ``(out, in)``), and every other ``Conv1D``
is transposed. BERT's token-type embeddings are written as zeros (two types), so the ``token_type_ids`` a
tokenizer hands the model change nothing.

The tokenizer is the run's own ``tokenizer.json``, which has no post-processor: ``AutoTokenizer`` adds no
``[CLS]`` / ``[SEP]`` the model never read, and ``pipeline("fill-mask")`` gives what ``glmlab fill`` gives.
Nothing is downloaded; the directory loads offline with ``AutoModelForMaskedLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from glmlab import atomic
from glmlab.errors import GlmlabError
from glmlab.interop.tokenizer_config import tokenizer_config
from glmlab.runs import TOKENIZER, LoadedRun
from glmlab.version import __version__

ARCHITECTURE = "BertForMaskedLM"
TYPE_VOCAB_SIZE = 2  # BERT's sentence A / B; written as zeros
_TIED = "head.decoder.weight"  # the word embeddings (BERT ties its decoder to them too)


def bert_state_dict(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """glmlab `bert` weights (a state dict) under ``BertForMaskedLM``'s names and layouts. Every weight finds its
    place (a weight left over is refused, never dropped)."""
    used: set[str] = {_TIED}

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name].detach().cpu()

    out = {"bert.embeddings.word_embeddings.weight": take("embeddings.wte.weight"),
           "bert.embeddings.position_embeddings.weight": take("embeddings.wpe.weight"),
           "bert.embeddings.LayerNorm.weight": take("embeddings.ln.weight"),
           "bert.embeddings.LayerNorm.bias": take("embeddings.ln.bias")}
    width = out["bert.embeddings.word_embeddings.weight"].shape[1]
    out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(TYPE_VOCAB_SIZE, width,
                                                                      dtype=out["bert.embeddings.LayerNorm.weight"].dtype)
    for i in range(n_layer):
        ours, theirs = f"h.{i}.", f"bert.encoder.layer.{i}."
        qkv_w = take(ours + "attn.c_attn.weight").split(width, dim=1)  # Conv1D (in, 3 * out)
        qkv_b = take(ours + "attn.c_attn.bias").split(width)
        for part, w, b in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            out[f"{theirs}attention.self.{part}.weight"] = w.t()
            out[f"{theirs}attention.self.{part}.bias"] = b
        for glmlab_name, hf_name in (("attn.c_proj", "attention.output.dense"), ("mlp.c_fc", "intermediate.dense"),
                                     ("mlp.c_proj", "output.dense")):
            out[f"{theirs}{hf_name}.weight"] = take(f"{ours}{glmlab_name}.weight").t()
            out[f"{theirs}{hf_name}.bias"] = take(f"{ours}{glmlab_name}.bias")
        for glmlab_name, hf_name in (("ln_1", "attention.output.LayerNorm"), ("ln_2", "output.LayerNorm")):
            for kind in ("weight", "bias"):
                out[f"{theirs}{hf_name}.{kind}"] = take(f"{ours}{glmlab_name}.{kind}")
    for kind in ("weight", "bias"):
        out[f"cls.predictions.transform.dense.{kind}"] = take(f"head.dense.{kind}")  # nn.Linear: same layout
        out[f"cls.predictions.transform.LayerNorm.{kind}"] = take(f"head.ln.{kind}")
    out["cls.predictions.bias"] = take("head.bias")
    left = sorted(set(state) - used)
    if left:
        raise GlmlabError(f"the bert model holds weights BertForMaskedLM has no place for: {', '.join(left[:5])}",
                          "export a run written by this glmlab version")
    return {k: v.contiguous() for k, v in out.items()}


def bert_config(run: LoadedRun) -> dict:
    """``config.json`` of the ``BertForMaskedLM`` a run's `bert` model is."""
    cfg = run.config.model
    return {"architectures": [ARCHITECTURE], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": 4 * cfg.n_embd, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.block_size,
            "type_vocab_size": TYPE_VOCAB_SIZE, "initializer_range": 0.02, "layer_norm_eps": cfg.layer_norm_epsilon,
            "position_embedding_type": "absolute", "is_decoder": False, "tie_word_embeddings": True,
            "pad_token_id": run.tokenizer.pad_id, "torch_dtype": "float32", "glmlab_version": __version__}


def write_bert(run: LoadedRun, hf_dir: Path) -> Path:
    """Write ``run`` (a `bert` run) into the new directory ``hf_dir`` as a ``BertForMaskedLM`` with its tokenizer
    (``tokenizer.json``, ``tokenizer_config.json``: ``[MASK]``, ``[CLS]``, ``[SEP]``, ``<pad>``, ``<unk>`` by role;
    ``special_tokens_map.json``)."""
    state = bert_state_dict(run.model.state_dict(), run.config.model.n_layer)
    atomic.write_with(hf_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic.write_json(hf_dir / "config.json", bert_config(run))
    atomic.write_bytes(hf_dir / "tokenizer.json", (run.run_dir / TOKENIZER).read_bytes())
    config = tokenizer_config(run.model, run.tokenizer)
    config.pop("chat_template", None)  # a masked LM writes no chat replies
    atomic.write_json(hf_dir / "tokenizer_config.json", config)
    atomic.write_json(hf_dir / "special_tokens_map.json", {k: v for k, v in config.items() if k.endswith("_token")})
    return hf_dir
