"""The FastAPI app: OpenAI-compatible endpoints, vLLM's error bodies, API keys, health and metrics."""

import logging
import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxpaged.server.async_engine import AsyncLLMEngine
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                      error_body)
from jaxpaged.server.serving import BadRequest, Serving

logger = logging.getLogger(__name__)


def _error(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, status, param), status_code=status)


def _package_version() -> str:
    try:
        return version("jaxpaged")
    except PackageNotFoundError:
        return "unknown"


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The server around a started (or starting) AsyncLLMEngine; `model_name` is what /v1/models lists."""
    app = FastAPI(title="jaxpaged OpenAI-compatible server", version=_package_version())
    metrics = ServerMetrics(lambda: engine.engine if engine.ready.is_set() else None, model_name)
    serving = Serving(engine, model_name, metrics)
    created = int(time.time())

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and \
                request.headers.get("Authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                            for e in exc.errors()) or "invalid request"
        return _error(400, message, "BadRequestError", loc[0] if loc else None)  # the top-level field

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("Request failed")
        return _error(500, f"internal error: {exc}", "InternalServerError")

    def unavailable() -> JSONResponse | None:
        if engine.start_error is not None:
            return _error(503, f"engine failed to start: {engine.start_error}", "ServiceUnavailableError")
        if not engine.ready.is_set():
            return _error(503, "the engine is still starting (loading and compiling)", "ServiceUnavailableError")
        return None

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != model_name:
            return _error(404, f"The model `{name}` does not exist.", "NotFoundError", "model")
        return None

    async def serve(req, handler):
        if (err := unavailable() or check_model(req.model)) is not None:
            return err
        try:
            result = await handler(req)
        except BadRequest as e:
            return _error(400, str(e), "BadRequestError", e.param)
        except ValueError as e:
            return _error(400, str(e), "BadRequestError")
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await serve(req, serving.completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await serve(req, serving.chat)

    @app.get("/v1/models")
    async def models():
        max_len = engine.engine.max_model_len if engine.ready.is_set() and engine.engine else None
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "jaxpaged", "root": model_name, "parent": None,
                                            "max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        return unavailable() or Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def get_version():
        return {"version": _package_version()}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if (err := unavailable() or check_model(req.model)) is not None:
            return err
        tok = engine.tokenizer
        if req.messages is not None:
            text = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            return _error(400, "give `prompt` or `messages`", "BadRequestError", "prompt")
        return {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if (err := unavailable() or check_model(req.model)) is not None:
            return err
        vocab = engine.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            return _error(400, f"token ids must be in [0, {vocab})", "BadRequestError", "tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    return app
