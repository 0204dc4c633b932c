"""The FastAPI app: vLLM's OpenAI-compatible endpoints, error bodies, API key, health, metrics, tokenize."""

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxpaged.config import EngineArgs
from jaxpaged.server.async_engine import AsyncLLMEngine, EngineStepError
from jaxpaged.server.metrics import CONTENT_TYPE, ServerMetrics
from jaxpaged.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeRequest,
                                      TokenizeResponse, VersionResponse)
from jaxpaged.server.serving_base import APIError, error_event
from jaxpaged.server.serving_chat import OpenAIServingChat, render_chat
from jaxpaged.server.serving_completions import OpenAIServingCompletion

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
_ERROR_DOCS = {code: {"model": ErrorResponse} for code in (400, 404, 500, 503)}


def package_version() -> str:
    try:
        return version("jaxpaged")
    except PackageNotFoundError:
        return "unknown"


class APIKeyMiddleware:
    """401 `{"error": "Unauthorized"}` on /v1/* without `Authorization: Bearer <key>` (as vLLM); pure ASGI, so
    streaming and disconnect detection pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self._expected):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _error(e: APIError) -> Response:
    return _json(e.body(), e.status)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """Runs `work` (a coroutine) but cancels it if the client goes away first, so its engine request is aborted."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.info("Client disconnected from %s; request aborted", request.url.path)
        return Response(status_code=499)
    return task.result()


async def _sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Waits for the first chunk before answering, so an error before any output is a proper HTTP error."""
    first = await anext(chunks)

    async def body():
        yield first
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:  # the 200 is sent: report it in the stream (vLLM does the same), then end it
            if not isinstance(e, (APIError, EngineStepError)):
                logger.exception("Stream failed")
            yield error_event(e)
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def build_app(engine: EngineArgs | AsyncLLMEngine | None = None, *, api_key: str | None = None) -> FastAPI:
    """The server app around an AsyncLLMEngine (built from EngineArgs, or given; None = default EngineArgs).

    The engine thread starts with the app (lifespan), so uvicorn accepts connections at once and `/health` is
    503 until the model is loaded and every bucket is compiled. An engine built here is shut down with the app.
    """
    owned = not isinstance(engine, AsyncLLMEngine)
    async_engine = AsyncLLMEngine(engine) if owned else engine

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        async_engine.start()
        yield
        if owned:
            await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="jaxpaged OpenAI-compatible server", version=package_version(), lifespan=lifespan)
    app.state.engine = async_engine
    metrics = ServerMetrics(async_engine.metrics, lambda: async_engine.model_name)
    completions = OpenAIServingCompletion(async_engine, metrics)
    chat = OpenAIServingChat(async_engine, metrics)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)

    def check_ready() -> None:
        if async_engine.start_error is not None:
            raise APIError(f"The engine failed to start: {async_engine.start_error}", None, 503,
                           "ServiceUnavailableError")
        if not async_engine.is_ready:
            raise APIError("The engine is starting (loading the model and compiling); retry when /health is 200.",
                           None, 503, "ServiceUnavailableError")

    async def serve(request: Request, handler, req) -> Response:
        check_ready()
        result = await _unless_disconnected(request, handler(req))
        if isinstance(result, BaseModel):
            return _json(result)
        if isinstance(result, Response):
            return result
        return await _unless_disconnected(request, _sse_response(result))

    @app.post("/v1/completions", responses=_ERROR_DOCS)
    async def create_completion(req: CompletionRequest, request: Request) -> Response:
        return await serve(request, completions.create, req)

    @app.post("/v1/chat/completions", responses=_ERROR_DOCS)
    async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Response:
        return await serve(request, chat.create, req)

    @app.get("/v1/models", response_model=ModelList)
    async def show_models() -> Response:
        check_ready()
        name = async_engine.model_name
        return _json(ModelList(data=[ModelCard(id=name, root=name, max_model_len=async_engine.max_model_len)]))

    @app.get("/health")
    async def health() -> Response:
        check_ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def show_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version", response_model=VersionResponse)
    async def show_version() -> Response:
        return _json(VersionResponse(version=package_version()))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_DOCS)
    async def tokenize(req: TokenizeRequest) -> Response:
        check_ready()
        completions.check_model(req.model)
        if req.messages is not None:
            text = render_chat(async_engine.tokenizer, req.messages, req.add_generation_prompt)
            ids = completions.encode(text, "messages", add_special_tokens=False)
        else:
            ids = completions.encode(req.prompt, "prompt", req.add_special_tokens)
        return _json(TokenizeResponse(count=len(ids), max_model_len=async_engine.max_model_len, tokens=ids))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_DOCS)
    async def detokenize(req: DetokenizeRequest) -> Response:
        check_ready()
        completions.check_model(req.model)
        completions.check_token_ids(req.tokens, "tokens")
        return _json(DetokenizeResponse(prompt=async_engine.tokenizer.decode(req.tokens)))

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": {"message", "type", "param", "code"}}`; pydantic / JSON errors are 400, not 422."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        fields = [[str(x) for x in err.get("loc", ()) if x != "body"] for err in errors]
        message = "; ".join(f"{'.'.join(f) or 'body'}: {err.get('msg')}" for f, err in zip(fields, errors))
        param = fields[0][0] if fields and fields[0] and not fields[0][0].isdigit() else None
        return _error(APIError(message or "invalid request", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return _error(APIError(str(e.detail), None, e.status_code, _ERROR_TYPES.get(e.status_code, "HTTPError")))

    @app.exception_handler(EngineStepError)
    async def engine_error(_: Request, e: EngineStepError) -> Response:
        return _error(APIError(str(e), None, 500, "InternalServerError"))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        logger.exception("Request failed")
        return _error(APIError(f"{type(e).__name__}: {e}", None, 500, "InternalServerError"))
