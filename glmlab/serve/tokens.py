"""``POST /tokenize`` and ``/detokenize``: the served model's tokenizer over HTTP."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glmlab.errors import GlmlabError
from glmlab.serve import protocol as P
from glmlab.serve.context import ServedDep

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request, served: ServedDep) -> JSONResponse:
    body = await served.body(request)
    served.check_model(P.Fields(body).string("model"))
    text = body.get("prompt", body.get("text"))
    if not isinstance(text, str):
        raise P.bad_request("prompt must be a string", "prompt", "invalid_type")
    tokenizer = served.tokenizer
    try:
        ids = tokenizer.encode_checked(text)
    except GlmlabError as exc:
        raise P.bad_request(exc.problem, "prompt", "unencodable_prompt") from None
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": served.model.block_size,
                         "token_strs": [tokenizer.decode([i], skip_special_tokens=False) for i in ids]})


@router.post("/detokenize")
async def detokenize(request: Request, served: ServedDep) -> JSONResponse:
    body = await served.body(request)
    served.check_model(P.Fields(body).string("model"))
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise P.bad_request("tokens must be a list of token ids", "tokens", "invalid_type")
    vocab = served.model.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise P.bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens",
                            "invalid_value")
    return JSONResponse({"prompt": served.tokenizer.decode(ids)})
