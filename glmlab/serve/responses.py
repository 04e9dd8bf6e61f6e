"""OpenAI response bodies: completion and chat objects, their streamed chunks (server-sent events), logprobs
in both shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from glmlab.data.tokenizer import Tokenizer
from glmlab.generation.continuous import RowEvent
from glmlab.generation.engine import TokenLogprob
from glmlab.generation.text import IncrementalText, text_offsets
from glmlab.serve.protocol import GenerationRequest, Prompt

log = logging.getLogger("glmlab.serve")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[TokenLogprob], offsets: list[int]) -> dict[str, list]:
    """The completions API's logprobs: parallel lists of tokens, their log-probabilities, the top
    alternatives and each token's offset in the text (an echoed prompt's first token has none: null). A
    closing ``<eos>`` is listed (as vLLM does: its text is not in the output, its log-probability counts)."""
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for _, t, lp in e.top} if e.logprob is not None else None for e in entries],
            "text_offset": offsets}


class Offsets:
    """A choice's ``text_offset`` as its tokens arrive: where each starts in the returned text (after the
    echoed prompt, whose own offsets come from decoding its tokens). ``context``: the prompt's ids, which the
    completion's text continues (see :func:`~glmlab.generation.text.continuation`)."""

    def __init__(self, tokenizer: Tokenizer, base: int = 0, context: Sequence[int] = ()) -> None:
        self.text, self.base = IncrementalText(tokenizer, context=context), base

    def of(self, entries: list[TokenLogprob]) -> list[int]:
        out = []
        for e in entries:
            out.append(self.base + len(self.text.text))
            self.text.push(e.token_id)
        return out


def chat_logprobs(entries: list[TokenLogprob], tokenizer: Tokenizer) -> dict[str, list]:
    """The chat API's logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``. ``bytes`` are what the
    token adds to the reply (joined, they make the content — less a word tokenizer's spaces between words; a
    special token adds none, a byte-level token may hold part of a character), ``token`` its text or special
    token's name."""
    table = tokenizer.token_bytes

    def one(token_id: int, token: str, logprob: float, shown: bytes | None = None) -> dict[str, Any]:
        raw = shown if shown is not None else table[token_id] if 0 <= token_id < len(table) else b""
        return {"token": token, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token_id, e.token, e.logprob, e.shown), "top_logprobs": [one(*t) for t in e.top]}
                        for e in entries]}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def text_chunk_format(rid: str, kind: str, created: int, name: str, chat: bool,
                      usage_null: bool) -> Callable[[str, int], str]:
    """A function (text, row) -> the server-sent event of a streamed chunk that only carries text (no
    log-probabilities, not the last): byte for byte what :func:`sse` makes of the chunk's dict, with only
    the text encoded per chunk — the chunk every token of a stream is."""
    head = ('data: {"id":' + json.dumps(rid) + ',"object":' + json.dumps(kind) + f',"created":{created}'
            + ',"model":' + json.dumps(name, ensure_ascii=False) + ',"choices":[{')
    tail = "]" + (',"usage":null' if usage_null else "") + "}\n\n"
    if chat:
        return lambda text, row: (f'{head}"index":{row},"delta":{{"content":{json.dumps(text, ensure_ascii=False)}}},'
                                  f'"logprobs":null,"finish_reason":null}}{tail}')
    return lambda text, row: (f'{head}"text":{json.dumps(text, ensure_ascii=False)},"index":{row},"logprobs":null,'
                              f'"finish_reason":null}}{tail}')


def completion_body(req: GenerationRequest, results: dict[int, Any], prompt_lp: list, name: str,
                    tokenizer: Tokenizer) -> dict[str, Any]:
    choices, generated = [], 0
    for r in range(len(results)):
        c, prompt = results[r], req.prompts[r // req.n]
        generated += c.generated_tokens
        if req.chat:
            choice = {"index": r, "message": {"role": "assistant", "content": c.text},
                      "logprobs": chat_logprobs(c.logprobs, tokenizer) if req.logprobs is not None else None,
                      "finish_reason": c.finish_reason}
        else:
            text = prompt.text + c.text if req.echo else c.text
            logprobs = None
            if req.logprobs is not None:
                echoed = prompt_lp[r // req.n] if req.echo else []
                offsets = Offsets(tokenizer, len(prompt.text) if req.echo else 0, prompt.ids)
                logprobs = completion_logprobs(echoed + list(c.logprobs or []),
                                               _echo_offsets(tokenizer, prompt, echoed) + offsets.of(c.logprobs or []))
            choice = {"text": text, "index": r, "logprobs": logprobs, "finish_reason": c.finish_reason}
        choices.append(choice)
    prompt_tokens = sum(p.tokens for p in req.prompts)
    return {"id": new_id("chatcmpl" if req.chat else "cmpl"),
            "object": "chat.completion" if req.chat else "text_completion", "created": now(), "model": name,
            "choices": choices, "usage": usage(prompt_tokens, generated)}


def _echo_offsets(tokenizer: Tokenizer, prompt: Prompt, echoed: list[TokenLogprob]) -> list[int]:
    """Where each echoed token starts in the echoed text: the tokenizer's own offsets into a text prompt (whose
    spacing a word tokenizer does not keep), else the decoded token ids' (a token-id prompt's text)."""
    if prompt.from_text:
        starts = [start for start, _ in tokenizer.hf.encode(prompt.text, add_special_tokens=False).offsets]
        if len(starts) == len(echoed):
            return starts
    return text_offsets(tokenizer, [e.token_id for e in echoed], keep_special=True)  # as the prompt's text has them


async def event_stream(req: GenerationRequest, queue: asyncio.Queue, prompt_lp: list, name: str,
                       tokenizer: Tokenizer) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice per step that produced text, ending with ``data: [DONE]``."""
    rid, created = new_id("chatcmpl" if req.chat else "cmpl"), now()
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    rows = len(req.prompts) * req.n
    usage_field = {"usage": None} if req.include_usage else {}

    def chunk(choice: dict[str, Any]) -> str:
        return sse({"id": rid, "object": kind, "created": created, "model": name, "choices": [choice],
                      **usage_field})

    text_chunk = text_chunk_format(rid, kind, created, name, req.chat, req.include_usage)

    offsets = [Offsets(tokenizer, len(req.prompts[r // req.n].text) if req.echo else 0, req.prompts[r // req.n].ids)
               for r in range(rows)]
    for r in range(rows):
        if req.chat:
            yield chunk({"index": r, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        elif req.echo:
            echoed, prompt = prompt_lp[r // req.n], req.prompts[r // req.n]
            lp = completion_logprobs(echoed, _echo_offsets(tokenizer, prompt, echoed)) \
                if req.logprobs is not None else None
            yield chunk({"text": prompt.text, "index": r, "logprobs": lp, "finish_reason": None})
    done, generated = 0, 0
    while done < rows:
        items = await queue.get()
        while not queue.empty() and not isinstance(items, BaseException):  # a slow reader: send what piled up
            more = queue.get_nowait()
            items = more if isinstance(more, BaseException) else items + more
        if isinstance(items, BaseException):  # what failed goes to the log, not to the client
            log.warning("a streamed request failed: %s", items)
            yield sse({"error": {"message": "generation failed in the server (its log says why); retry the request",
                                 "type": "server_error", "param": None, "code": "generation_failed"}})
            break
        for r, event in merge_events(items):
            generated += len(event.token_ids)
            if event.completion is not None and event.completion.error:
                yield sse({"error": {"message": f"the output could not follow the requested format: "
                                                f"{event.completion.error}", "type": "invalid_request_error",
                                     "param": req.format_param, "code": "grammar_failed"}})
            finish = event.completion.finish_reason if event.completion is not None else None
            done += finish is not None
            delta = event.delta
            if req.chat:
                if not (delta or finish or event.logprobs):
                    continue
                lp = chat_logprobs(event.logprobs, tokenizer) if req.logprobs is not None and event.logprobs else None
                if delta and lp is None and finish is None:
                    yield text_chunk(delta, r)
                    continue
                yield chunk({"index": r, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                             "finish_reason": finish})
            else:
                if not (delta or finish or event.logprobs):
                    continue
                lp = None
                if req.logprobs is not None:
                    lp = completion_logprobs(event.logprobs, offsets[r].of(event.logprobs))
                if lp is None and finish is None:
                    yield text_chunk(delta, r)
                    continue
                yield chunk({"text": delta, "index": r, "logprobs": lp, "finish_reason": finish})
    if req.include_usage:
        yield sse({"id": rid, "object": kind, "created": created, "model": name, "choices": [],
                     "usage": usage(sum(p.tokens for p in req.prompts), generated)})
    yield sse("[DONE]")


def merge_events(items: list[tuple[int, RowEvent]]) -> list[tuple[int, RowEvent]]:
    """One event per row: the deltas, tokens and logprobs of several steps joined, in row order."""
    if len(items) == 1:
        return items
    merged: dict[int, RowEvent] = {}
    for r, event in items:
        into = merged.get(r)
        if into is None:
            merged[r] = RowEvent(event.key, event.delta, list(event.token_ids), list(event.logprobs),
                                 event.completion)
        else:
            into.delta += event.delta
            into.token_ids += event.token_ids
            into.logprobs += event.logprobs
            into.completion = event.completion or into.completion
    return sorted(merged.items())
