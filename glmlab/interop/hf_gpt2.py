"""Hugging Face GPT-2 checkpoints in and out: ``glmlab import-hf`` and ``glmlab export-hf`` (which hand a BERT to
:mod:`glmlab.interop.hf_bert`).

glmlab's `gpt` family uses GPT-2's parameter names and layouts, so weights cross by a plain copy
(the causal-mask buffers of old checkpoints are dropped, a missing ``transformer.`` prefix added,
the tied LM head shared). Nothing is downloaded: both directions work on local directories, and an
export loads offline with ``GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from glmlab import atomic
from glmlab.config import resolve_config
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import start_token_id
from glmlab.interop import hf_bert
from glmlab.interop.hf_files import HFCheckpoint, load_state, load_tokenizer, model_type, named_tokens, read_json
from glmlab.interop.tokenizer_config import tokenizer_config
from glmlab.models import build_model
from glmlab.models.transformer import Conv1D
from glmlab.runs import CONFIG, TOKENIZER, WEIGHTS, LoadSpec, load_run, save_weights
from glmlab.version import __version__

ARCHITECTURE = "GPT2LMHeadModel"
# Hugging Face's activation names → glmlab's model.activation (the tanh approximations are one function)
ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                       "gelu": "gelu"}
SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS_FROM_HF)
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _special_tokens(hf_dir: Path, config: dict[str, Any], tok: HFTokenizer) -> dict[str, str]:
    """Which tokens play glmlab's roles (eos, bos, pad, unk) in an imported tokenizer. GPT-2 names its one
    ``<|endoftext|>`` as eos, bos and unk; a byte-level tokenizer never produces an unknown token, so an unk that
    is the end-of-text token is left out (it would count every document end as unknown)."""
    roles = named_tokens(hf_dir, tok, ("eos", "bos", "pad", "unk"))
    for role in ("eos", "bos", "pad"):
        token_id = config.get(f"{role}_token_id")
        if role not in roles and isinstance(token_id, int) and tok.id_to_token(token_id) is not None:
            roles[role] = tok.id_to_token(token_id)
    if "eos" not in roles:
        raise GlmlabError(f"cannot tell the end-of-text token of {hf_dir}",
                          "set eos_token_id in config.json or eos_token in tokenizer_config.json")
    if roles.get("unk") == roles["eos"]:
        del roles["unk"]
    return roles


def hf_tokenizer(hf_dir: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory, with the tokens that play glmlab's roles (from its
    tokenizer_config.json, special_tokens_map.json or config.json). A BERT's is renumbered as its import is
    (:func:`glmlab.interop.hf_bert.bert_tokenizer`), so data it encodes fits the imported model."""
    hf_dir = Path(hf_dir)
    if hf_bert.is_bert(hf_dir):
        return hf_bert.bert_tokenizer(hf_dir)[0]
    config = read_json(hf_dir / "config.json") if (hf_dir / "config.json").is_file() else {}
    tok = load_tokenizer(hf_dir)
    return Tokenizer(tok, _special_tokens(hf_dir, config, tok))


def read_hf(hf_dir: str | Path) -> HFCheckpoint:
    """A local Hugging Face GPT-2 or BERT (masked LM) directory as a glmlab `gpt` or `bert`, by config.json's
    ``model_type``."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise GlmlabError(f"{hf_dir} is not a directory", "give the directory a model was saved to")
    return hf_bert.read_bert(hf_dir) if model_type(hf_dir) == "bert" else read_gpt2(hf_dir)


def read_gpt2(hf_dir: str | Path) -> HFCheckpoint:
    """Read a local Hugging Face GPT-2 directory (:func:`read_hf` checked it is one), refusing what glmlab's `gpt`
    cannot hold."""
    hf_dir = Path(hf_dir)
    config = read_json(hf_dir / "config.json")
    if config.get("model_type") != "gpt2":
        raise GlmlabError(f"{hf_dir} holds a {config.get('model_type')!r} model; glmlab reads GPT-2 and BERT models",
                          "convert the model to GPT-2 or use transformers directly")
    activation = config.get("activation_function", "gelu_new")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise GlmlabError(f"activation {activation!r} is not supported", f"use one of {SUPPORTED_ACTIVATIONS}")
    missing_keys = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if k not in config]
    if missing_keys:
        raise GlmlabError(f"{hf_dir / 'config.json'} lacks {', '.join(missing_keys)}", "give a GPT-2 config.json")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise GlmlabError(f"n_inner={config['n_inner']} differs from 4 x n_embd, which glmlab's gpt assumes")
    if config.get("tie_word_embeddings", True) is False:
        raise GlmlabError("the model has an untied LM head; glmlab's gpt ties it to the token embeddings",
                          "import a tied GPT-2 model")
    section = {"family": "gpt", "vocab_size": config["vocab_size"], "block_size": config.get("n_positions", 1024),
               "n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": config["n_embd"],
               "dropout": config.get("resid_pdrop", 0.1), "bias": True,
               "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
               "activation": ACTIVATIONS_FROM_HF[activation]}
    model = build_model(resolve_config({"model": section}).model)
    state = {}
    for name, tensor in load_state(hf_dir).items():
        if name.endswith(_BUFFERS) or name == "lm_head.weight":
            continue
        state[name if name.startswith("transformer.") else f"transformer.{name}"] = tensor
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not match the config
        raise GlmlabError(f"the weights in {hf_dir} do not match its config.json "
                          f"({str(exc).splitlines()[-1].strip()})") from None
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise GlmlabError(f"the weights in {hf_dir} do not fit a GPT-2 of this config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return HFCheckpoint(section, model, hf_tokenizer(hf_dir))


def output_directory(path: Path) -> None:
    """Create the directory a command writes into; a file of that name is a clear error, not a traceback."""
    if path.exists() and not path.is_dir():
        raise GlmlabError(f"{path} is a file, not a directory", "give a directory to write into (it is created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GlmlabError(f"cannot create {path}: {exc.strerror or exc}", "check the path and its permissions") \
            from None


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Turn a local Hugging Face GPT-2 or BERT (masked LM) directory into a glmlab run directory."""
    hf_dir, out = Path(hf_dir), Path(out)
    if (out / CONFIG).exists():
        raise GlmlabError(f"{out} already holds a run", "choose another --out")
    checkpoint = read_hf(hf_dir)
    run_config = resolve_config({"model": checkpoint.section})
    output_directory(out)
    checkpoint.tokenizer.save(out / TOKENIZER)
    save_weights(checkpoint.model, out / WEIGHTS)
    atomic.write_json(out / CONFIG, {**run_config.to_dict(), "special_tokens": checkpoint.tokenizer.special_tokens,
                                     "load": LoadSpec().to_dict(), "imported_from": str(hf_dir.resolve()),
                                     "glmlab_version": __version__})
    return out


def export_hf(run_dir: str | Path, hf_dir: str | Path, checkpoint: str = "best") -> Path:
    """Write a run as a Hugging Face directory (config, safetensors weights, tokenizer files): the architecture
    its traits name — GPT-2 here, ``BertForMaskedLM`` in :mod:`glmlab.interop.hf_bert`."""
    run = load_run(run_dir, checkpoint=checkpoint)
    cfg = run.config.model
    architecture = run.model.traits.hf_architecture
    if architecture not in (ARCHITECTURE, hf_bert.ARCHITECTURE):
        raise GlmlabError(f"family {cfg.family!r} has no Hugging Face equivalent", "export-hf takes gpt and bert runs")
    hf_dir = Path(hf_dir)
    if hf_dir.resolve() == Path(run_dir).resolve() or (hf_dir / CONFIG).exists():
        raise GlmlabError(f"{hf_dir} already holds a model (config.json)", "export into a new directory")
    output_directory(hf_dir)
    if architecture == hf_bert.ARCHITECTURE:
        return hf_bert.write_bert(run, hf_dir)
    tok = run.tokenizer
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items() if k != "lm_head.weight"}
    for name, module in run.model.named_modules():  # GPT-2 always has biases: zeros compute the same function
        if isinstance(module, (Conv1D, torch.nn.LayerNorm)) and module.bias is None:
            state[f"{name}.bias"] = torch.zeros(module.weight.shape[-1])
    atomic.write_with(hf_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    eos, bos = tok.eos_id, start_token_id(run.model, tok)  # the start token the model read (tokenizer_config)
    atomic.write_json(hf_dir / "config.json", {
        "architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": "gelu" if cfg.activation == "gelu" else "gelu_new",
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_id,
        "torch_dtype": "float32", "glmlab_version": __version__})
    atomic.write_bytes(hf_dir / "tokenizer.json", (Path(run_dir) / TOKENIZER).read_bytes())
    config = tokenizer_config(run.model, tok, run.chat_template.source)
    atomic.write_json(hf_dir / "tokenizer_config.json", config)
    atomic.write_json(hf_dir / "special_tokens_map.json", {k: v for k, v in config.items() if k.endswith("_token")})
    atomic.write_json(hf_dir / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos,
                                                          "pad_token_id": tok.pad_id})
    return hf_dir


