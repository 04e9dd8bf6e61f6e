"""What runs the server rather than the model: ``GET /health``, ``/metrics`` (Prometheus) and the playground."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from glmlab.serve.context import ServedDep

STATIC = resources.files("glmlab.serve") / "static"  # the playground's files (HTML, JS, CSS; no build step)
router = APIRouter()


@router.get("/health")
async def health(served: ServedDep) -> JSONResponse:
    scheduler = served.scheduler
    if not scheduler.alive:
        raise served.unavailable(RuntimeError(scheduler.failure or "the model thread is not running"), logged=False)
    return JSONResponse({"status": "ok", "model": served.options.model_name})


@router.get("/metrics")
async def metrics_text(served: ServedDep) -> PlainTextResponse:
    return PlainTextResponse(served.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-cache"})
