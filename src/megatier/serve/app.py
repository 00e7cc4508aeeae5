"""The FastAPI application: OpenAI-compatible routes, the API key check, and OpenAI-style errors.

Every error, whatever raised it, leaves as {"error": {"message", "type", "param", "code"}} with a
4xx/5xx status, and the server carries on. A request is cancelled in the engine (its KV pages freed) as
soon as its client disconnects, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from megatier import __version__
from megatier.bench.common import device_name, git_commit
from megatier.errors import MegatierError
from megatier.llm import LLM
from megatier.sampling import SamplingParams
from megatier.serve.async_engine import AsyncEngine, EngineFailure, Overloaded, RequestStream
from megatier.serve.metrics import ServerMetrics
from megatier.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
    template_messages,
)
from megatier.serve.responses import SSE_DONE, ChatFormat, Choice, CompletionFormat, sse

# Paths anyone may call when --api-key is set: probes and monitoring.
OPEN_PATHS = {"/health", "/metrics", "/version"}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, **kw) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, **kw)


@contextlib.contextmanager
def bad_input(param: str | None) -> Iterator[None]:
    """Turn a MegatierError raised inside into a 400 that names the request field at fault."""
    try:
        yield
    except MegatierError as e:
        raise ApiError(400, str(e), param) from None


@dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    metrics: ServerMetrics
    model_name: str
    started: int
    info: dict[str, Any]

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist: this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )


def _state(request: Request) -> ServerState:
    return request.app.state.megatier


router = APIRouter()


# -- generation --------------------------------------------------------------------------------------------


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    tokenizer = state.llm.tokenizer
    with bad_input("prompt"):
        prompts = body.prompt_ids(tokenizer)
    with bad_input("echo"):
        echo = body.echo_texts(prompts, tokenizer) if body.echo else None
    with bad_input(None):
        max_tokens = 1 if body.prompt_only else body.max_tokens
        params = body.sampling_params(
            state.llm.default_sampling_params(), max_tokens, body.logprobs, body.engine_prompt_logprobs()
        )
    _check_params(state, params, body)
    fmt = CompletionFormat(
        state.model_name,
        params.n,
        params.logprobs,
        tokenizer,
        prompts,
        body.include_usage,
        body.continuous_usage,
        echo=echo,
        prompt_only=body.prompt_only,
        prompt_top_n=body.prompt_logprobs,
    )
    with bad_input("prompt"):
        stream = state.engine.submit(prompts, params)
    return await _respond(request, body.stream, stream, fmt)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    tokenizer = state.llm.tokenizer
    with bad_input("tool_choice" if body.tool_choice not in (None, "auto", "none") else "tools"):
        tool_use = body.tool_use
    with bad_input("messages"):
        prompt = body.prompt_ids(tokenizer)
    with bad_input("top_logprobs"):
        top_n = body.num_logprobs()
    with bad_input(None):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling_params(state.llm.default_sampling_params(), max_tokens, top_n)
    _check_params(state, params, body)
    with bad_input("messages"):
        stream = state.engine.submit([prompt], params)
    fmt = ChatFormat(
        state.model_name,
        params.n,
        params.logprobs,
        tokenizer,
        [prompt],
        body.include_usage,
        body.continuous_usage,
        tool_use=tool_use,
    )
    return await _respond(request, body.stream, stream, fmt)


def _check_params(state: ServerState, params: SamplingParams, body: GenerationRequest) -> None:
    """What only the model can judge (logit_bias token ids, whether a grammar compiles for its tokenizer),
    before the request is admitted."""
    with bad_input("logit_bias"):
        state.llm.engine.check_logit_bias(params)
    with bad_input(body.structured_field()):
        state.llm.engine.check_structured_output(params)


async def _respond(
    request: Request, streaming: bool, stream: RequestStream, fmt: CompletionFormat | ChatFormat
) -> Response:
    prompt_tokens = sum(len(p) for p in fmt.prompts)
    if streaming:
        return EventStream(_events(stream, fmt, prompt_tokens), stream)
    choices = await _collect(request, stream, fmt)
    return JSONResponse(fmt.response(choices, prompt_tokens))


async def _collect(request: Request, stream: RequestStream, fmt: CompletionFormat | ChatFormat) -> list[Choice]:
    """Gather every update of a non-streaming request; cancel it at once if the client goes away."""
    watcher = asyncio.create_task(_close_on_disconnect(request, stream))
    try:
        choices = [Choice() for _ in range(len(fmt.prompts) * fmt.n)]
        async for prompt_index, update in stream:
            choices[prompt_index * fmt.n + update.index].add(fmt.take(update))
        return choices
    except MegatierError as e:
        raise ApiError(400, str(e)) from None
    except EngineFailure as e:
        raise ApiError(500, str(e)) from None
    finally:
        watcher.cancel()
        stream.close()


async def _close_on_disconnect(request: Request, stream: RequestStream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.close()


async def _events(stream: RequestStream, fmt: CompletionFormat | ChatFormat, prompt_tokens: int) -> AsyncIterator[str]:
    """The SSE body: opening chunks, one chunk per update with text, the usage chunk, then [DONE]."""
    for chunk in fmt.opening():
        yield sse(chunk)
    completion_tokens = 0
    try:
        async for prompt_index, raw in stream:
            update = fmt.take(raw)
            completion_tokens += len(update.new_token_ids)
            chunk = fmt.chunk(prompt_index * fmt.n + update.index, update)
            if chunk is not None:
                yield sse(chunk)
    except (MegatierError, EngineFailure) as e:
        yield sse(error_body(400 if isinstance(e, MegatierError) else 500, str(e)))
    else:
        if fmt.include_usage:
            yield sse(fmt.usage_chunk(prompt_tokens, completion_tokens))
    yield SSE_DONE


class EventStream(StreamingResponse):
    """A server-sent event stream that closes its RequestStream however the response ends: finished,
    client disconnected (Starlette cancels the body at once), or server shutting down."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], stream: RequestStream):
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()


# -- models, tokens, probes --------------------------------------------------------------------------------


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "megatier",
        "root": str(state.llm.model_path),
        "max_model_len": state.llm.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(model_id)
    return _model_card(state)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(body.model)
    tokenizer = state.llm.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer")
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send either 'prompt' or 'messages'", "prompt")
    if body.prompt is not None:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        with bad_input("messages"):
            ids = tokenizer.encode_chat(template_messages(body.messages))
    return {"count": len(ids), "max_model_len": state.llm.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(body.model)
    tokenizer = state.llm.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer")
    bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


@router.get("/health")
async def health(request: Request) -> Response:
    if not _state(request).engine.alive:
        return error_response(503, "the engine thread is not running")
    return Response(status_code=200)


def server_info(llm: LLM, served_model_name: str) -> dict[str, Any]:
    """What the server runs on, for `GET /v1/megatier/info`: a load client records the server's device,
    backend and commit rather than its own. Read once at start: none of it changes while serving."""
    return {
        "version": __version__,
        "commit": git_commit() or __version__,
        "device": device_name(llm.device),
        "device_type": llm.device.type,
        "torch": torch.__version__,
        "backend": llm.backend,
        "model": served_model_name,
        "model_path": str(llm.model_path),
        "load_format": llm.args.load_format,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "quantization": llm.args.quantization,
        "quant_kinds": llm.quant_kinds,
        "max_num_seqs": llm.engine.scheduler.max_num_seqs,
        "max_num_batched_tokens": llm.engine.scheduler.max_num_batched_tokens,
        "max_model_len": llm.max_model_len,
        "kv_pages": llm.stats.kv_pages,
    }


@router.get("/v1/megatier/info")
async def info(request: Request) -> dict[str, Any]:
    return _state(request).info


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# -- errors and authentication -----------------------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, str(exc), exc.param, exc.code)


async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return error_response(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One line naming the first field at fault (pydantic lists every failed union member: say so once)."""
    errors = exc.errors()
    first = errors[0]
    path = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return error_response(400, f"the request body is not valid JSON: {reason}")
    if not path:
        return error_response(400, "the request body must be a JSON object")
    param = path[0] if first["type"] != "missing" else ".".join(path)
    fields = {str(e["loc"][1]) for e in errors if len(e["loc"]) > 1}
    more = f" ({len(fields) - 1} more fields are invalid)" if len(fields) > 1 else ""
    return error_response(400, f"{'.'.join(path)}: {first['msg']}{more}", param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal server error: {exc!r}")


class ApiKeyAuth(AuthenticationBackend):
    """Bearer token check in constant time (secrets.compare_digest), before the body is even read."""

    def __init__(self, api_key: str):
        self.key = api_key.encode()

    async def authenticate(self, conn: HTTPConnection):
        if conn.url.path in OPEN_PATHS:
            return None
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key):
            raise AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        return AuthCredentials(["api"]), SimpleUser("api")


def _auth_error(conn: HTTPConnection, exc: AuthenticationError) -> JSONResponse:
    return error_response(401, str(exc), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def create_app(llm: LLM, *, served_model_name: str, api_key: str | None = None, max_queue_len: int = 256) -> FastAPI:
    """The server for `llm`. Its engine thread starts and stops with the app's lifespan."""
    metrics = ServerMetrics(llm.stats.kv_pages)
    engine = AsyncEngine(llm.engine, metrics, max_queue_len)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="megatier", version=__version__, lifespan=lifespan)
    info = server_info(llm, served_model_name)
    app.state.megatier = ServerState(llm, engine, metrics, served_model_name, int(time.time()), info)
    if api_key:
        app.add_middleware(AuthenticationMiddleware, backend=ApiKeyAuth(api_key), on_error=_auth_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(router)
    return app
