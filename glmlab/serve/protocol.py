"""The OpenAI request shapes, checked: JSON bodies become prompts and :class:`GenerationSettings`, and
every mistake becomes an OpenAI-shaped error (``{"error": {"message", "type", "param", "code"}}``)
with a 4xx status that names the field, the value and the allowed range.

Chat messages become a prompt through the plain template of :mod:`glmlab.generation.chat`. What a row starts
from depends on the model, as in :func:`glmlab.generation.generate.generate_batch`: a causal model's prompt (after
its start token, cut to fit), a glm's prompt read as Part A, or a prompt and ``suffix`` laid out to fill the
middle (:func:`glmlab.generation.infill.prompt_ids`); a model that does not decode left to right (bert) writes
by mask-predict, so its requests may only ask for what mask-predict honours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.chat import CHAT_ROLES, PLAIN_TEMPLATE, ChatTemplate
from glmlab.generation.grammar import Grammar, compiler
from glmlab.generation.infill import prompt_ids
from glmlab.generation.mask_predict import layout, unsupported
from glmlab.generation.settings import MAX_LOGPROBS, GenerationSettings
from glmlab.models.contract import LanguageModel
from glmlab.serve.fields import Fields, Limits, bad_request, unknown_parameter


@dataclass
class Prompt:
    """One prompt: its text (for echo), its ids as generation reads them (start token, cut to fit; a glm's
    framing; a fill-in-the-middle layout with ``suffix``) and all of its own (what echo scores)."""

    text: str
    ids: list[int]
    tokens: int  # prompt tokens counted for usage
    whole: list[int] = field(default_factory=list)
    added_start: bool = False  # the server put the model's start token first (not part of the text)
    from_text: bool = True  # given as text (else as token ids, and ``text`` is their decoding)
    source: str | list[int] = ""  # as the request gave it (what mask-predict reads)
    suffix: str | None = None  # the text after the middle to write (fill-in-the-middle)


@dataclass
class GenerationRequest:
    """A checked completions or chat request: what to decode and how to answer."""

    model: str | None
    prompts: list[Prompt]
    settings: GenerationSettings
    n: int
    stream: bool
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions: alternatives per token; chat: top_logprobs when logprobs is on
    chat: bool = False
    generate: bool = True  # False: max_tokens=0 with echo (the prompt's log-probabilities, nothing generated)
    mask_predict: bool = False  # a masked LM (bert): written all at once by mask-predict, not in the batch

    @property
    def format_param(self) -> str:
        """The field that asked for structured output (what a grammar failure names)."""
        grammar = self.settings.grammar
        return "grammar" if grammar is not None and grammar.kind == "gbnf" else "response_format"
    extra_stops: list[str] = field(default_factory=list)


def sampling_settings(f: Fields, limits: Limits, default_max_tokens: int, least: int = 1) -> GenerationSettings:
    """The controls shared by completions and chat, OpenAI names first, then vLLM's extensions. ``least``:
    the smallest max_tokens allowed (0 for an echo that only scores its prompt)."""
    max_tokens = f.integer("max_tokens", None, least, limits.max_tokens,
                           hint=" (this server's limit: glmlab serve --max-tokens)")
    if max_tokens == 0:
        max_tokens = 1  # nothing is generated (GenerationRequest.generate); the settings stay valid
    if max_tokens is None:
        max_tokens = f.integer("max_completion_tokens", min(default_max_tokens, limits.max_tokens), 1,
                               limits.max_tokens, hint=" (this server's limit: glmlab serve --max-tokens)")
    top_k = f.integer("top_k", 0, -1, 2**31 - 1)
    settings = GenerationSettings(
        max_new_tokens=max_tokens,
        min_new_tokens=f.integer("min_tokens", 0, 0, max_tokens),
        temperature=f.number("temperature", 1.0, 0.0),
        top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(0, top_k),  # -1 = off, as in vLLM
        min_p=f.number("min_p", 0.0, 0.0, 1.0),
        presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=f.number("repetition_penalty", 1.0, 0.01, 100.0),  # beyond: logits overflow
        stop=f.stop(limits),
        stop_at_eos=not f.boolean("ignore_eos", False),
        seed=f.integer("seed", None, 0, 2**63 - 1),
    )
    return settings


def logit_bias(f: Fields, vocab_size: int) -> dict[int, float]:
    """OpenAI's ``logit_bias``: {"token id": bias in [-100, 100]}, at most 300 entries, ids in the vocabulary."""
    value = f.body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 300:
        raise bad_request("logit_bias must be an object of at most 300 {\"token id\": bias} entries", "logit_bias",
                          "invalid_type")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12 else -1
        if not 0 <= token < vocab_size or isinstance(bias, bool) or not isinstance(bias, int | float) \
                or not -100 <= bias <= 100:
            raise bad_request(f"logit_bias[{json.dumps(key)[:40]}]={json.dumps(bias)[:40]}: keys are token ids of "
                              f"this model (0..{vocab_size - 1}), values biases between -100 and 100", "logit_bias",
                              "invalid_value")
        out[token] = float(bias)
    return out


# --- which parameters -----------------------------------------------------------------------------------------
# Every field of a request is honoured or refused with a 400 naming it, never ignored (null counts as absent).
# OpenAI's documented parameters that ask for something this server cannot do are refused unless their value
# asks for nothing; identifiers kept for the caller's own bookkeeping are accepted.

COMPLETION_FIELDS = frozenset({
    "model", "prompt", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
    "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p"})  # suffix: runs that infill
CHAT_FIELDS = frozenset({
    "model", "messages", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "temperature",
    "top_p"})
EXTENSIONS = frozenset({"top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens"})  # vLLM's names
STRUCTURED_FIELDS = frozenset({"response_format", "grammar"})  # on both endpoints: structured_output()
BOOKKEEPING = frozenset({"user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                         "prompt_cache_options", "metadata", "parallel_tool_calls"})
NEUTRAL = {  # accepted at these values only
    "store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "function_call": ("none",)}
UNSUPPORTED = {
    "best_of": "best_of is not supported by this server (use n and pick, or num_beams in the Python API)",
    "store": "store=true: this server stores no completions",
    "service_tier": "this server has one service tier: use 'auto' or 'default'",
    "modalities": "this server writes text only: modalities may only be [\"text\"]",
    "tools": "tools (function calling) are not supported by this server",
    "functions": "functions (function calling) are not supported by this server",
    "tool_choice": "tool_choice: this server calls no tools (use 'none')",
    "function_call": "function_call: this server calls no functions (use 'none')",
    "audio": "audio output is not supported by this server",
    "prediction": "predicted outputs are not supported by this server",
    "reasoning_effort": "reasoning_effort: this model does not reason before it answers",
    "verbosity": "verbosity is not supported by this server (use max_tokens)",
    "web_search_options": "web search is not supported by this server",
    "moderation": "moderation is not supported by this server",
}


def check_fields(body: dict[str, Any], chat: bool) -> None:
    """Refuse any field this server would otherwise ignore (see the table above)."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name, value in body.items():
        if value is None or name in known or name in EXTENSIONS or name in BOOKKEEPING or name in STRUCTURED_FIELDS:
            continue
        if name == "best_of" and value == (body.get("n") or 1):
            continue  # best_of == n: n samples, every one returned
        if value in NEUTRAL.get(name, ()):
            continue
        if name in UNSUPPORTED:
            raise bad_request(UNSUPPORTED[name], name, "unsupported_parameter")
        raise unknown_parameter(name, "/v1/chat/completions" if chat else "/v1/completions")


def structured_output(f: Fields, tokenizer: Tokenizer, vocab_size: int) -> Grammar | None:
    """``response_format`` (OpenAI's: text, json_object, json_schema) or ``grammar`` (llama.cpp's GBNF), checked
    and compiled for this tokenizer (a grammar it cannot write is a 400 here, not a failure later)."""
    fmt, gbnf = f.body.get("response_format"), f.body.get("grammar")
    grammar, param = None, "response_format"
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise bad_request("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                              "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}", param,
                              "invalid_value")
        if kind == "json_object":
            grammar = Grammar("json_object")
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise bad_request("response_format.json_schema must be an object with a schema object", param,
                                  "invalid_value")
            grammar = Grammar("json_schema", json.dumps(spec["schema"]))
    if gbnf is not None:
        if grammar is not None:
            raise bad_request("give response_format or grammar, not both", "grammar", "invalid_value")
        if not isinstance(gbnf, str) or not gbnf.strip():
            raise bad_request("grammar must be a GBNF grammar (llama.cpp's format, start rule root)", "grammar",
                              "invalid_type")
        grammar, param = Grammar("gbnf", gbnf), "grammar"
    if grammar is not None:
        try:
            compiler(tokenizer, vocab_size).matcher(grammar)
        except GlmlabError as exc:
            raise bad_request(exc.problem + (f"; {exc.fix}" if exc.fix else ""), param, "invalid_grammar") from None
    return grammar


def stream_options(f: Fields, stream: bool) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    options = f.body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request("stream_options must be an object like {\"include_usage\": true}", "stream_options",
                          "invalid_type")
    for key, value in options.items():
        if key != "include_usage" and value not in (None, False):  # e.g. include_obfuscation: no padding here
            raise bad_request(f"stream_options.{key} is not supported by this server", f"stream_options.{key}",
                              "unsupported_parameter")
    if not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options", "invalid_value")
    return bool(options.get("include_usage", False))


def encode(tokenizer: Tokenizer, prompt: str | list[int], block_size: int, vocab_size: int, start: int | None,
           limits: Limits, param: str = "prompt", may_be_empty: bool = False) -> Prompt:
    """A prompt's ids, checked (not empty unless ``may_be_empty``: a prefix before a suffix; encodable; within
    --max-prompt-tokens), after ``start`` when the model reads one, and cut to its last ``block_size - 1`` tokens
    when longer than the context."""
    if isinstance(prompt, str):
        if not prompt and not may_be_empty:
            raise bad_request(f"{param} is empty; give some text to continue", param, "empty_prompt")
        check_length(tokenizer, prompt, limits, param)
        try:
            ids = tokenizer.encode_checked(prompt)
        except GlmlabError as exc:
            raise bad_request(f"{param} cannot be encoded: {exc.problem}", param, "unencodable_prompt") from None
        text = prompt
    else:
        if not prompt:
            raise bad_request(f"{param} is empty; give at least one token id", param, "empty_prompt")
        bad = [i for i in prompt if not 0 <= i < vocab_size]
        if bad:
            raise bad_request(f"{param} token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})", param,
                              "invalid_value")
        ids, text = list(prompt), tokenizer.decode(prompt, skip_special_tokens=False)  # echoed as sent, specials too
    if len(ids) > limits.max_prompt_tokens:
        raise bad_request(f"{param} has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens} "
                          "(glmlab serve --max-prompt-tokens)", param, "prompt_too_long")
    added = start is not None and (isinstance(prompt, str) or ids[0] != start)  # token ids may bring it themselves
    if added:
        ids = [start, *ids]
    keep = max(1, block_size - 1)  # room for at least one generated token; a longer prompt keeps its end
    return Prompt(text, ids[-keep:], len(ids), ids, added, isinstance(prompt, str), prompt)


def check_length(tokenizer: Tokenizer, text: str, limits: Limits, param: str) -> None:
    """Refuse a text too long for --max-prompt-tokens by its characters alone, before the work of encoding it:
    a token stands for at most ``tokenizer.max_token_chars`` characters."""
    most = tokenizer.max_token_chars
    if most is not None and len(text) > limits.max_prompt_tokens * most:
        raise bad_request(f"{param} has {len(text)} characters, so more than {limits.max_prompt_tokens} tokens (a "
                          f"token of this tokenizer is at most {most} characters); this server accepts at most "
                          f"{limits.max_prompt_tokens} (glmlab serve --max-prompt-tokens)", param, "prompt_too_long")


def check_suffix(f: Fields, model: LanguageModel | None, tokenizer: Tokenizer, limits: Limits) -> str | None:
    """``suffix`` (OpenAI's insertion: the text after the one to write), checked: a string this tokenizer
    encodes, within --max-prompt-tokens, for a run that can fill in the middle (a gpt trained with
    ``train.fim_rate``, a glm, a bert); any other run refuses it rather than ignore it."""
    suffix = f.string("suffix")
    if suffix is None:
        return None
    traits = model.traits if model is not None else None
    if traits is None or traits.infilling is None:
        what = f"this {traits.family} run" if traits is not None else "this model"
        raise bad_request(f"suffix: {what} cannot fill in the middle (only a glm, a bert or a gpt trained with "
                          "train.fim_rate > 0 can); drop suffix to continue the prompt", "suffix",
                          "unsupported_parameter")
    check_length(tokenizer, suffix, limits, "suffix")
    try:
        ids = tokenizer.encode_checked(suffix, "suffix")
    except GlmlabError as exc:
        raise bad_request(f"suffix cannot be encoded: {exc.problem}", "suffix", "unencodable_prompt") from None
    if len(ids) > limits.max_prompt_tokens:
        raise bad_request(f"suffix has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens} "
                          "(glmlab serve --max-prompt-tokens)", "suffix", "prompt_too_long")
    return suffix


def frame(prompt: Prompt, model: LanguageModel, tokenizer: Tokenizer, suffix: str | None, start: int | None) -> None:
    """Lay out a checked prompt as :func:`~glmlab.generation.infill.prompt_ids` does for ``generate_batch``: a
    glm's prompt read as Part A (``[gMASK]``, or ``[MASK]`` before the suffix, then ``<|startofpiece|>``), a
    fill-in-the-middle gpt's prompt and suffix between its sentinels. Usage counts the ids the row reads."""
    source = prompt.source
    if not prompt.from_text and start is not None and not prompt.added_start:
        source = source[1:]  # token ids that bring the start token: prompt_ids puts it back, once
    try:
        prompt.ids = prompt_ids(model, tokenizer, source, suffix)
    except GlmlabError as exc:  # the prompt was checked already: what is left is the suffix's room or blanks
        raise bad_request(f"suffix: {exc.problem}" + (f" ({exc.fix})" if exc.fix else ""), "suffix",
                          "invalid_value") from None
    prompt.suffix = suffix
    prompt.tokens = len(prompt.ids)


# mask-predict's settings names that a request spells otherwise
REQUEST_NAMES = {"min_new_tokens": "min_tokens"}


def refuse_beyond_mask_predict(f: Fields, settings: GenerationSettings, echo: bool, family: str) -> None:
    """A masked LM (bert) writes ``max_tokens`` tokens at once by mask-predict (after the prompt, before the
    suffix), which honours temperature, top_p, top_k, stop, seed, n, ignore_eos and stream (each text comes whole,
    in one chunk): any other control (:func:`~glmlab.generation.mask_predict.unsupported`) is a 400 naming its
    field (null and the value that asks for nothing pass)."""
    fmt = f.body.get("response_format")
    asked = ["echo"] if echo else []
    asked += [REQUEST_NAMES.get(name, name) for name in unsupported(settings)]
    asked += ["response_format"] if fmt is not None and fmt != {"type": "text"} else []
    asked += ["grammar"] if f.present("grammar") else []
    if asked:
        raise bad_request(f"{asked[0]}: a {family} run writes by mask-predict (all its tokens at once), which cannot "
                          "honour it; use temperature, top_p, top_k, stop, seed, n, ignore_eos, max_tokens (the "
                          "length it writes) and suffix", asked[0], "unsupported_parameter")


def mask_predicted(req: GenerationRequest, model: LanguageModel, tokenizer: Tokenizer, suffix: str | None) -> None:
    """What a masked LM's rows read (:func:`~glmlab.generation.mask_predict.layout`: the prompt, ``max_tokens``
    masks, the suffix): usage counts the prompt and suffix tokens it keeps."""
    family = model.traits.family
    length = req.settings.max_new_tokens
    tail_ids = tokenizer.encode_checked(suffix, "suffix") if suffix is not None else None  # checked: encodable
    tail = len(tail_ids or [])
    if length + tail >= model.block_size:
        raise bad_request(f"max_tokens={length} (the length a {family} run writes) and a suffix of {tail} tokens do "
                          f"not fit its context of {model.block_size}: ask for at most {model.block_size - tail - 1}",
                          "max_tokens", "context_length_exceeded")
    for p in req.prompts:
        try:
            seq, _ = layout(tokenizer, p.source, tail_ids, length, model.block_size, model.vocab_size)
        except GlmlabError as exc:
            raise bad_request(f"suffix: {exc.problem}", "suffix", "invalid_value") from None
        p.ids, p.suffix, p.tokens = seq, suffix, len(seq) - length
    req.mask_predict = True


def check_fits(prompt: Prompt, block_size: int, start: int | None, param: str) -> None:
    """A prompt whose every token is scored (echo with logprobs) must fit one window: the model reads all its
    tokens but the last (the first is scored by nothing), so it may hold ``block_size + 1`` with the start token.
    Cutting it would misalign the log-probabilities with the echoed text, so a longer one is refused (as vLLM
    refuses a prompt longer than max_model_len)."""
    if len(prompt.whole) <= block_size + 1:
        return
    room = block_size + 1 - prompt.added_start
    raise bad_request(f"this model's maximum context length (max_model_len) is {block_size} tokens, and with echo and "
                      f"logprobs every prompt token is scored in one window, so a prompt may have at most {room} "
                      f"tokens; {param} has {prompt.tokens - prompt.added_start}: shorten it (lm-evaluation-harness's "
                      f"local-completions: model_args max_length={room + 1}, one more for the generated token)", param,
                      "context_length_exceeded")


def prompt_list(value: Any, param: str = "prompt") -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of such lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
               for v in value):
            return [list(v) for v in value]
    if isinstance(value, list) and not value:
        raise bad_request(f"{param} is an empty list; give at least one", param, "empty_prompt")
    raise bad_request(f"{param} must be a string, a list of strings, a list of token ids or a list of such lists",
                      param, "invalid_type")


def completion_request(body: dict[str, Any], tokenizer: Tokenizer, block_size: int, vocab_size: int,
                       start: int | None, limits: Limits, model: LanguageModel | None = None) -> GenerationRequest:
    """``POST /v1/completions``. With ``model``, each prompt is laid out for it (see the module docstring); without
    one, as a causal model's that cannot fill in the middle."""
    check_fields(body, chat=False)
    f = Fields(body)
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt", "missing_field")
    texts = prompt_list(body["prompt"])
    echo = f.boolean("echo", False)
    suffix = check_suffix(f, model, tokenizer, limits)
    if suffix is not None and echo:
        raise bad_request("echo with suffix: the model reads the prompt around the blank it fills (with the suffix), "
                          "so an echo of the prompt and its log-probabilities would not be what it read; ask "
                          "without echo and join prompt, text and suffix yourself", "echo", "unsupported_parameter")
    settings = sampling_settings(f, limits, default_max_tokens=16, least=0 if echo else 1)
    n = _n(f, limits, len(texts))
    logprobs = f.integer("logprobs", None, 0, min(MAX_LOGPROBS, vocab_size))
    settings.logprobs = logprobs
    settings.logit_bias = logit_bias(f, vocab_size)
    if model is not None and not model.traits.left_to_right:
        refuse_beyond_mask_predict(f, settings, echo, model.traits.family)
    settings.grammar = structured_output(f, tokenizer, vocab_size)
    stream = f.boolean("stream", False)
    request = GenerationRequest(f.string("model"), [], settings, n, stream, stream_options(f, stream), echo=echo,
                                logprobs=logprobs, generate=body.get("max_tokens") != 0)
    names = ["prompt" if len(texts) == 1 else f"prompt[{i}]" for i in range(len(texts))]
    request.prompts = [encode(tokenizer, t, block_size, vocab_size, start, limits, name, suffix is not None)
                       for t, name in zip(texts, names, strict=True)]
    if echo and logprobs is not None:
        for prompt, name in zip(request.prompts, names, strict=True):
            check_fits(prompt, block_size, start, name)
    _validate(settings)
    if model is not None:
        _lay_out(request, model, tokenizer, suffix, start)
    return request


def _lay_out(request: GenerationRequest, model: LanguageModel, tokenizer: Tokenizer, suffix: str | None,
             start: int | None) -> None:
    """What each row of ``request`` starts from, for ``model`` (see the module docstring)."""
    traits = model.traits
    if not traits.left_to_right:
        mask_predicted(request, model, tokenizer, suffix)
    elif suffix is not None or traits.objective == "blank_infilling":
        for prompt in request.prompts:
            frame(prompt, model, tokenizer, suffix, start)


def _n(f: Fields, limits: Limits, prompts: int) -> int:
    n = f.integer("n", 1, 1, limits.max_n, hint=" (this server's limit: glmlab serve --max-n)")
    if n * prompts > limits.max_rows:
        raise bad_request(f"{prompts} prompts x n={n} asks for {n * prompts} completions; at most {limits.max_rows} "
                          "per request", "n", "invalid_value")
    return n


def _validate(settings: GenerationSettings) -> None:
    try:
        settings.validate()
    except GlmlabError as exc:
        raise bad_request(exc.problem.removeprefix("invalid sampling setting: ")) from None


# --- chat ----------------------------------------------------------------------------------------------

def chat_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                          "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", where, "invalid_type")
        for key, value in m.items():
            if key not in ("role", "content") and value is not None:  # name, tool_calls, ...: refused, not ignored
                raise bad_request(f"{where}.{key} is not supported by this server's chat template (role and content "
                                  "only)", f"{where}.{key}", "unsupported_parameter")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad_request(f"{where}.role={json.dumps(role)} is not supported; use one of "
                              f"{', '.join(CHAT_ROLES)}", f"{where}.role", "invalid_value")
        if isinstance(content, list):  # content parts: only text
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise bad_request(f"{where}.content may only hold text parts", f"{where}.content", "invalid_value")
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out


def chat_request(body: dict[str, Any], tokenizer: Tokenizer, block_size: int, vocab_size: int, start: int | None,
                 limits: Limits, model: LanguageModel | None = None,
                 template: ChatTemplate | None = None) -> GenerationRequest:
    """``POST /v1/chat/completions``: the messages through the run's chat template (``template``; the plain one by
    default), then as a completion that ends at the template's end of turn (a glm reads the conversation as Part
    A). A masked LM (bert) writes no chat reply: a 400 saying what it can do."""
    template = template or ChatTemplate(PLAIN_TEMPLATE, tokenizer)
    check_fields(body, chat=True)
    f = Fields(body)
    if model is not None and not model.traits.left_to_right:
        raise bad_request(f"a {model.traits.family} run writes by mask-predict (a given number of tokens, all at "
                          "once), not a chat reply token by token: use /v1/completions with max_tokens (the length "
                          "it writes) and an optional suffix, or glmlab generate / glmlab fill", None,
                          "unsupported_model")
    if "messages" not in body:
        raise bad_request("messages is required", "messages", "missing_field")
    try:
        prompt = template.render(chat_messages(body["messages"]))
    except GlmlabError as exc:  # a template that refuses these messages (raise_exception, a role it lacks)
        raise bad_request(exc.problem, "messages", "invalid_value") from None
    settings = sampling_settings(f, limits, default_max_tokens=256)
    n = _n(f, limits, 1)
    top = f.integer("top_logprobs", None, 0, min(MAX_LOGPROBS, vocab_size))
    logprobs = (top or 0) if f.boolean("logprobs", False) else None
    if top is not None and logprobs is None:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
    settings.logprobs = logprobs
    settings.stop = settings.stop + [s for s in template.stops if s not in settings.stop]
    settings.stop_token_ids = list(template.end_ids)
    settings.chat_reply = True  # stops apply to the reply after its leading whitespace; logprobs line up with it
    settings.grammar = structured_output(f, tokenizer, vocab_size)
    settings.logit_bias = logit_bias(f, vocab_size)
    stream = f.boolean("stream", False)
    request = GenerationRequest(f.string("model"), [encode(tokenizer, prompt, block_size, vocab_size, start, limits,
                                                           "messages")],
                                settings, n, stream, stream_options(f, stream), logprobs=logprobs, chat=True)
    _validate(settings)
    if model is not None:
        _lay_out(request, model, tokenizer, None, start)
    return request
