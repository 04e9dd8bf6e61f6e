"""``POST /v1/embeddings`` in OpenAI's shape: one vector per input (a string, strings, token ids or lists of
them), as floats or base64 (little-endian float32, what the ``openai`` client decodes), with usage. What a
vector is, per family, is :mod:`glmlab.embeddings`'s; ``pooling`` ("mean" or "last") is glmlab's extension."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glmlab import embeddings as E
from glmlab.errors import GlmlabError
from glmlab.serve import protocol as P
from glmlab.serve.context import ServedDep
from glmlab.serve.fields import Fields, bad_request, refuse_unknown

router = APIRouter()
FIELDS = {"input", "model", "encoding_format", "dimensions", "user", "pooling"}


@router.post("/v1/embeddings")
async def create_embeddings(request: Request, served: ServedDep) -> JSONResponse:
    body = await served.body(request)
    f = Fields(body)
    served.check_model(f.string("model"))
    refuse_unknown(body, FIELDS, "/v1/embeddings")
    model, tokenizer, limits = served.model, served.tokenizer, served.limits
    width = E.embedding_width(model)
    if not width:
        raise bad_request(f"this run's family ({model.traits.family}) has no embeddings", "model", "unsupported")
    if "input" not in body:
        raise bad_request("input is required", "input", "missing_field")
    inputs = P.prompt_list(body["input"], "input")
    if len(inputs) > limits.max_rows:
        raise bad_request(f"input holds {len(inputs)} texts; at most {limits.max_rows} per request", "input",
                            "invalid_value")
    encoding = f.string("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request(f"encoding_format={encoding!r} is not supported: use 'float' or 'base64'",
                            "encoding_format", "invalid_value")
    dimensions = f.integer("dimensions", width, 1)
    if dimensions != width:
        raise bad_request(f"dimensions={dimensions}: this model's embeddings have {width} dimensions and cannot be "
                            "shortened (they were not trained to be)", "dimensions", "unsupported")
    pooling = f.string("pooling", "mean")
    f.string("user")  # an end-user id, for the caller's own tracking: nothing to do with it here
    try:
        E.check_pooling(model, pooling)
    except GlmlabError as exc:
        raise bad_request(f"{exc.problem}; {exc.fix}", "pooling", "invalid_value") from None
    try:
        ids = E.encode_inputs(model, tokenizer, inputs)
    except GlmlabError as exc:
        code = "context_length_exceeded" if isinstance(exc, E.TextTooLong) else "invalid_value"
        raise bad_request(f"{exc.problem}; {exc.fix}", "input", code) from None
    vectors = await served.on_model_thread(lambda: E.embed_ids(model, tokenizer, ids, pooling).numpy())
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i, v in enumerate(vectors)]
    tokens = sum(map(len, ids))
    return JSONResponse({"object": "list", "data": data, "model": served.options.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encoded(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
