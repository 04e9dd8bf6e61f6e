"""BERT in and out: a `bert` run as a Hugging Face ``BertForMaskedLM`` directory (``glmlab export-hf``), and a
``BertForMaskedLM`` / ``BertForPreTraining`` directory as a `bert` run (``glmlab import-hf``, ``train --init``,
``prepare --tokenizer-from``: :func:`read_bert`, :func:`bert_tokenizer`).

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

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from glmlab import atomic
from glmlab.config import resolve_config
from glmlab.data.tokenizer import FIRST_TEXT_ID, ROLES, Tokenizer
from glmlab.errors import GlmlabError
from glmlab.interop.hf_files import HFCheckpoint, load_state, load_tokenizer, model_type, named_tokens, read_json
from glmlab.interop.tokenizer_config import tokenizer_config
from glmlab.models import build_model
from glmlab.runs import TOKENIZER, LoadedRun
from glmlab.version import __version__

ARCHITECTURE = "BertForMaskedLM"
TYPE_VOCAB_SIZE = 2  # BERT's sentence A / B; written as zeros
_TIED = "head.decoder.weight"  # the word embeddings (BERT ties its decoder to them too)
# glmlab's names against BertForMaskedLM's, for both directions: each block's Conv1D projections (BERT's
# nn.Linear holds them transposed) and LayerNorms, the embeddings and the prediction head (the same layouts)
PROJECTIONS = (("attn.c_proj", "attention.output.dense"), ("mlp.c_fc", "intermediate.dense"),
               ("mlp.c_proj", "output.dense"))
LAYER_NORMS = (("ln_1", "attention.output.LayerNorm"), ("ln_2", "output.LayerNorm"))
EMBEDDINGS = (("embeddings.wte.weight", "bert.embeddings.word_embeddings.weight"),
              ("embeddings.wpe.weight", "bert.embeddings.position_embeddings.weight"),
              ("embeddings.ln.weight", "bert.embeddings.LayerNorm.weight"),
              ("embeddings.ln.bias", "bert.embeddings.LayerNorm.bias"))
HEAD = tuple((f"head.{ours}.{kind}", f"cls.predictions.transform.{theirs}.{kind}")
             for ours, theirs in (("dense", "dense"), ("ln", "LayerNorm")) for kind in ("weight", "bias")) + \
    (("head.bias", "cls.predictions.bias"),)


def copied_weights(n_layer: int) -> list[tuple[str, str, bool]]:
    """Every weight that crosses by a copy, as (glmlab's name, BERT's name, transposed): all but the fused q/k/v
    projection and the token-type embeddings."""
    pairs = [(ours, theirs, False) for ours, theirs in (*EMBEDDINGS, *HEAD)]
    for i in range(n_layer):
        ours, theirs = f"h.{i}.", f"bert.encoder.layer.{i}."
        for glmlab_name, hf_name in PROJECTIONS:  # Conv1D (in, out) against nn.Linear (out, in)
            pairs += [(f"{ours}{glmlab_name}.weight", f"{theirs}{hf_name}.weight", True),
                      (f"{ours}{glmlab_name}.bias", f"{theirs}{hf_name}.bias", False)]
        pairs += [(f"{ours}{glmlab_name}.{kind}", f"{theirs}{hf_name}.{kind}", False)
                  for glmlab_name, hf_name in LAYER_NORMS for kind in ("weight", "bias")]
    return pairs


def bert_state_dict(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """glmlab `bert` weights (a state dict) under ``BertForMaskedLM``'s names and layouts. Every weight finds its
    place (a weight left over is refused, never dropped)."""
    used: set[str] = {_TIED}

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name].detach().cpu()

    out = {theirs: take(ours).t() if transposed else take(ours)
           for ours, theirs, transposed in copied_weights(n_layer)}
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


# --- in: glmlab import-hf (and train --init, prepare --tokenizer-from) of a BERT -----------------------------

BERT_ROLES = ("pad", "unk", "mask", "cls", "sep")  # the roles a BERT tokenizer names; each moves to glmlab's id
_BERT_TOKENS = dict(zip(BERT_ROLES, ("[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]"), strict=True))
_RESERVED = re.compile(r"\[unused\d+\]")  # BERT's vocabulary slots kept free for new tokens
_UNUSED_WEIGHTS = ("bert.pooler.", "cls.seq_relationship.")  # BertForPreTraining's next-sentence head
_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def is_bert(hf_dir: Path) -> bool:
    """Whether a Hugging Face directory holds a BERT (config.json says so) or, saved alone, a BERT's WordPiece
    tokenizer."""
    kind = model_type(hf_dir)
    if kind is not None:
        return kind == "bert"
    if (hf_dir / "tokenizer.json").is_file():
        return (read_json(hf_dir / "tokenizer.json").get("model") or {}).get("type") == "WordPiece"
    return (hf_dir / "vocab.txt").is_file()


def bert_tokenizer(hf_dir: Path) -> tuple[Tokenizer, list[int]]:
    """A BERT's WordPiece tokenizer renumbered for glmlab, and the renumbering (new id -> BERT's id).

    glmlab's code finds ``[PAD]``, ``<unk>``, ``[MASK]``, ``[CLS]``, ``[SEP]`` at fixed ids (0, 1, 4, 5, 6) and
    treats ids below ``FIRST_TEXT_ID`` as special tokens, so BERT's role tokens move to those ids, the other
    special ids take the vocabulary's remaining special or reserved (``[unusedN]``) tokens, and every other token
    keeps its order after them. ``[SEP]`` also plays glmlab's ``<eos>`` (what separates documents, and ends a text
    a classifier reads). The post-processor is dropped: glmlab adds no ``[CLS]`` / ``[SEP]`` of its own (write them
    in a text for a model pre-trained with them). A tokenizer glmlab wrote (an exported bert run's) is taken as it
    is."""
    from_vocab = not (hf_dir / "tokenizer.json").is_file() and (hf_dir / "vocab.txt").is_file()
    tok = _vocab_txt_tokenizer(hf_dir) if from_vocab else load_tokenizer(hf_dir)
    spec = json.loads(tok.to_str())
    if (spec.get("model") or {}).get("type") != "WordPiece":
        own = Tokenizer(tok)  # glmlab's own tokens by name: export-hf of a glmlab bert run, read back as it is
        if all(own.has_role(role, at_glmlab_id=True) for role in BERT_ROLES):
            return own, list(range(own.vocab_size))
        raise GlmlabError(f"the tokenizer of {hf_dir} is {(spec.get('model') or {}).get('type')}, neither BERT's "
                          "WordPiece nor one glmlab wrote", "give a BERT directory saved by save_pretrained")
    roles = named_tokens(hf_dir, tok, BERT_ROLES)
    for role, token in _BERT_TOKENS.items():
        if role not in roles and tok.token_to_id(token) is not None:
            roles[role] = token
    missing = [role for role in BERT_ROLES if role not in roles]
    if missing or len(set(roles.values())) < len(roles):
        raise GlmlabError(f"cannot tell BERT's {', '.join(f'{r}_token' for r in missing) or 'special tokens'} in "
                          f"{hf_dir} (each role needs a token of its own)",
                          "name them in tokenizer_config.json (pad_token, unk_token, mask_token, cls_token, "
                          "sep_token)")
    if from_vocab:  # read whole in a text, as BertTokenizer reads them
        tok.add_special_tokens(list(roles.values()))
        spec = json.loads(tok.to_str())
    order = _glmlab_order(tok, roles, hf_dir)
    new_id = {old: new for new, old in enumerate(order)}
    spec["model"]["vocab"] = {token: new_id[i] for token, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        added["id"] = new_id[added["id"]]
    spec["post_processor"] = spec["padding"] = spec["truncation"] = None
    renumbered = HFTokenizer.from_str(json.dumps(spec))
    return Tokenizer(renumbered, {**roles, "eos": roles["sep"]}), order


def _vocab_txt_tokenizer(hf_dir: Path) -> HFTokenizer:
    """BERT's WordPiece tokenizer from ``vocab.txt`` alone, built as ``BertTokenizer`` builds it: lower-cased as
    ``tokenizer_config.json``'s ``do_lower_case`` says (default yes), Chinese characters split apart."""
    settings = read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    unk = named_tokens(hf_dir, None, ("unk",)).get("unk", _BERT_TOKENS["unk"])
    try:
        tok = HFTokenizer(models.WordPiece.from_file(str(hf_dir / "vocab.txt"), unk_token=unk))
    except Exception as exc:  # tokenizers raises plain Exception on an unreadable vocabulary
        raise GlmlabError(f"{hf_dir / 'vocab.txt'} cannot be read as a WordPiece vocabulary "
                          f"({str(exc).splitlines()[0]})", "give the vocab.txt saved with the model") from None
    tok.normalizer = normalizers.BertNormalizer(lowercase=bool(settings.get("do_lower_case", True)),
                                                strip_accents=settings.get("strip_accents"),
                                                handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _glmlab_order(tok: HFTokenizer, roles: dict[str, str], hf_dir: Path) -> list[int]:
    """BERT's id for each new id (see :func:`bert_tokenizer`)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if len(vocab) != size:
        raise GlmlabError(f"the vocabulary of {hf_dir} has {len(vocab)} distinct tokens for ids 0-{size - 1} (a gap "
                          "in its ids, or a token listed twice)",
                          "give a BERT whose vocab.txt / tokenizer.json numbers each token once, without gaps")
    token_of = {i: t for t, i in vocab.items()}
    fixed = {ROLES.index(role): vocab[roles[role]] for role in BERT_ROLES}
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    spare = [i for i in range(size) if i not in fixed.values()
             and (token_of[i] in specials or _RESERVED.fullmatch(token_of[i]))]
    free = [slot for slot in range(FIRST_TEXT_ID) if slot not in fixed]
    if len(spare) < len(free):
        raise GlmlabError(f"the vocabulary of {hf_dir} has {len(fixed) + len(spare)} special or reserved "
                          f"([unusedN]) tokens; glmlab keeps ids 0-{FIRST_TEXT_ID - 1} for special tokens and needs "
                          f"{FIRST_TEXT_ID} to put there",
                          "add [unusedN] tokens to the vocabulary (and rows to the model), as BERT's own have")
    head = {**fixed, **dict(zip(free, spare, strict=False))}
    taken = set(head.values())
    return [head[slot] for slot in range(FIRST_TEXT_ID)] + [i for i in range(size) if i not in taken]


def _bert_section(hf_dir: Path, config: dict) -> dict:
    """The glmlab `bert` model section of a BertForMaskedLM config.json; what glmlab's `bert` cannot be, refused."""
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "max_position_embeddings") if not isinstance(config.get(k), int)]
    if missing:
        raise GlmlabError(f"{hf_dir / 'config.json'} lacks {', '.join(missing)}", "give a BERT config.json")
    width = config["hidden_size"]
    differs = [f"{key}={config.get(key)!r} ({why})" for key, ok, why in (
        ("hidden_act", config.get("hidden_act", "gelu") == "gelu", "glmlab's bert uses the exact GELU"),
        ("intermediate_size", config.get("intermediate_size", 4 * width) == 4 * width, "glmlab's is 4 x hidden_size"),
        ("position_embedding_type", config.get("position_embedding_type", "absolute") == "absolute",
         "glmlab's are absolute"),
        ("is_decoder", not config.get("is_decoder", False), "glmlab's bert reads both sides"),
        ("tie_word_embeddings", config.get("tie_word_embeddings", True), "glmlab ties the decoder to the embeddings"),
    ) if not ok]
    if differs:
        raise GlmlabError(f"{hf_dir} holds a BERT glmlab's bert cannot be: {'; '.join(differs)}",
                          "use transformers directly for this model")
    return {"family": "bert", "vocab_size": config["vocab_size"], "block_size": config["max_position_embeddings"],
            "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"], "n_embd": width,
            "dropout": config.get("hidden_dropout_prob", 0.1),
            "layer_norm_epsilon": config.get("layer_norm_eps", 1e-12)}


def glmlab_state_dict(state: dict[str, torch.Tensor], n_layer: int, hf_dir: Path,
                      order: list[int]) -> dict[str, torch.Tensor]:
    """BertForMaskedLM (or BertForPreTraining) weights under glmlab `bert`'s names and layouts: the inverse of
    :func:`bert_state_dict`, the vocabulary's rows (embeddings, output bias) in ``order`` (BERT's id for each of
    glmlab's). Sentence A's token-type embedding is added to every position's (glmlab reads one segment: the same
    sums); the pooler and next-sentence head have no use in a masked LM and are left out; any other weight left
    over is refused."""
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items() if not k.startswith(_UNUSED_WEIGHTS) and k not in _BUFFERS}
    if "cls.predictions.bias" not in state and "cls.predictions.decoder.bias" in state:
        state["cls.predictions.bias"] = state.pop("cls.predictions.decoder.bias")
    state.pop("cls.predictions.decoder.bias", None)  # the same tensor as cls.predictions.bias
    if not any(k.startswith("cls.predictions.") for k in state):
        raise GlmlabError(f"{hf_dir} holds no masked-LM head (cls.predictions): a BertModel alone cannot fill "
                          "masks", "give a BertForMaskedLM or BertForPreTraining directory")
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise GlmlabError(f"{hf_dir} lacks the weight {name}", "give a directory saved by save_pretrained")
        used.add(name)
        return state[name].detach().float()

    out = {ours: take(theirs).t() if transposed else take(theirs)
           for ours, theirs, transposed in copied_weights(n_layer)}
    types = take("bert.embeddings.token_type_embeddings.weight")
    out["embeddings.wpe.weight"] = out["embeddings.wpe.weight"] + types[0]
    for i in range(n_layer):
        ours, theirs = f"h.{i}.", f"bert.encoder.layer.{i}."
        parts = [f"{theirs}attention.self.{part}" for part in ("query", "key", "value")]
        out[ours + "attn.c_attn.weight"] = torch.cat([take(f"{p}.weight").t() for p in parts], dim=1)
        out[ours + "attn.c_attn.bias"] = torch.cat([take(f"{p}.bias") for p in parts])
    decoder = state.get("cls.predictions.decoder.weight")
    if decoder is not None:
        used.add("cls.predictions.decoder.weight")
        if not torch.equal(decoder.float(), out["embeddings.wte.weight"]):
            raise GlmlabError(f"{hf_dir} has a decoder untied from its word embeddings; glmlab's bert ties them",
                              "import a BERT with tied embeddings")
    left = sorted(set(state) - used)
    if left:
        raise GlmlabError(f"{hf_dir} holds weights glmlab's bert has no place for: {', '.join(left[:5])}",
                          "check it has the layers its config.json says (num_hidden_layers)")
    index = torch.tensor(order)
    for name in ("embeddings.wte.weight", "head.bias"):
        out[name] = out[name][index]
    out[_TIED] = out["embeddings.wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def read_bert(hf_dir: Path) -> HFCheckpoint:
    """A local BertForMaskedLM (or BertForPreTraining) directory as glmlab's `bert`, its vocabulary renumbered as
    :func:`bert_tokenizer` says (the embedding rows and the output bias moved with it: the same function of the
    same tokens)."""
    section = _bert_section(hf_dir, read_json(hf_dir / "config.json"))
    tokenizer, order = bert_tokenizer(hf_dir)
    if len(order) > section["vocab_size"]:
        raise GlmlabError(f"the tokenizer of {hf_dir} has {len(order)} tokens and the model {section['vocab_size']}",
                          "give the tokenizer saved with the model")
    order += range(len(order), section["vocab_size"])  # rows past the tokenizer's stay where they are
    model = build_model(resolve_config({"model": section}).model)
    try:
        model.load_state_dict(glmlab_state_dict(load_state(hf_dir), section["n_layer"], hf_dir, order))
    except (RuntimeError, IndexError) as exc:  # shapes that do not match the config
        raise GlmlabError(f"the weights in {hf_dir} do not match its config.json "
                          f"({str(exc).splitlines()[-1].strip()})", "give the config.json saved with the weights") \
            from None
    return HFCheckpoint(section, model, tokenizer)
