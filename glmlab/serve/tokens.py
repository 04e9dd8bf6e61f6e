"""The served model's tokenizer over HTTP, in vLLM's shapes: ``POST /tokenize`` and ``/detokenize``, and
``GET /tokenizer_info`` (the tokenizer's ``tokenizer_config.json``: what lm-evaluation-harness's ``remote``
tokenizer reads, so it needs no copy of the tokenizer and no hub)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glmlab.errors import GlmlabError
from glmlab.interop.tokenizer_config import tokenizer_config
from glmlab.serve.context import ServedDep
from glmlab.serve.fields import Fields, bad_request, refuse_unknown

router = APIRouter()


@router.get("/tokenizer_info")
async def tokenizer_info(served: ServedDep) -> JSONResponse:
    return JSONResponse(tokenizer_config(served.model, served.tokenizer, served.run.chat_template.source))


@router.post("/tokenize")
async def tokenize(request: Request, served: ServedDep) -> JSONResponse:
    """``{"prompt"}`` -> its token ids; ``add_special_tokens`` (default true, as in vLLM) puts the start token a
    sentence-level model reads first (a model of running text reads none)."""
    body = await served.body(request)
    f = Fields(body)
    served.check_model(f.string("model"))
    refuse_unknown(body, {"model", "prompt", "text", "add_special_tokens", "return_token_strs"}, "/tokenize")
    text = body.get("prompt", body.get("text"))
    if not isinstance(text, str):
        raise bad_request("prompt must be a string", "prompt", "invalid_type")
    tokenizer = served.tokenizer
    start = served.start if f.boolean("add_special_tokens", True) else None
    f.boolean("return_token_strs", False)  # token_strs come with every answer

    def tokenized() -> JSONResponse:  # on a worker thread, off the event loop: a long text takes a while
        ids = tokenizer.encode_checked(text)
        if start is not None:
            ids = [start, *ids]
        texts = {i: tokenizer.decode([i], skip_special_tokens=False) for i in set(ids)}  # each distinct id once
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": served.model.block_size,
                             "token_strs": [texts[i] for i in ids]})  # rendered here too

    try:
        return await asyncio.to_thread(tokenized)
    except GlmlabError as exc:
        raise bad_request(exc.problem, "prompt", "unencodable_prompt") from None


@router.post("/detokenize")
async def detokenize(request: Request, served: ServedDep) -> JSONResponse:
    body = await served.body(request)
    served.check_model(Fields(body).string("model"))
    refuse_unknown(body, {"model", "tokens"}, "/detokenize")
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise bad_request("tokens must be a list of token ids", "tokens", "invalid_type")
    vocab = served.model.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens",
                            "invalid_value")
    return JSONResponse({"prompt": served.tokenizer.decode(ids)})
