"""The HTTP side: FastAPI routes for OpenAI's ``/v1/models`` and ``/v1/chat/completions`` (plain and streamed
as server-sent events), the chat page at ``/``, the API key, and the body-size limit."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from phi3v.serve.config import ServeConfig
from phi3v.serve.engine import Answer, Engine, Job
from phi3v.serve.protocol import (
    ApiError,
    chunk,
    completion,
    completion_id,
    parse_chat_request,
    parse_json,
    usage,
)


def create_app(config: ServeConfig, engine: Engine | None = None):
    """The FastAPI application. The engine is loaded here unless given (a given one is shared, e.g. by apps
    with other keys or limits, and is not closed with this app)."""
    owned = engine is None
    engine = engine or Engine(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owned:  # an engine passed in may serve other apps too
            engine.close()

    app = FastAPI(title="phi3v serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(ApiError(400, str(err)).body(), status_code=400)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return files("phi3v.serve").joinpath("chat.html").read_text()

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "phi3v"} for name in engine.names]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await _read_body(request, config.max_body_bytes)
        chat = await run_in_threadpool(parse_chat_request, parse_json(body), engine.names, config)
        try:
            prompt_tokens = await run_in_threadpool(engine.prompt_tokens, chat.conversation)
        except ValueError as err:
            raise ApiError(400, f"'messages': {err}", "messages") from err
        if prompt_tokens > config.max_prompt_tokens:
            message = (f"'messages': the prompt is {prompt_tokens} tokens (images included), more than this "
                       f"server's limit of {config.max_prompt_tokens}")  # fmt: skip
            raise ApiError(400, message, "messages", "context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, text)

        def on_done(result: Answer | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, result)

        engine.submit(Job(chat, on_text if chat.stream else (lambda text: None), on_done))
        cid = completion_id()
        if not chat.stream:
            while not isinstance(result := await events.get(), Answer | BaseException):
                pass
            if isinstance(result, BaseException):
                raise ApiError(500, f"generation failed: {result}")
            return completion(cid, chat.model, result.text, result.finish_reason, prompt_tokens,
                              result.completion_tokens)  # fmt: skip

        async def stream():
            yield _sse(chunk(cid, chat.model, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if isinstance(event, str):
                    yield _sse(chunk(cid, chat.model, {"content": event}))
                elif isinstance(event, BaseException):
                    yield _sse(ApiError(500, f"generation failed: {event}").body())
                    break
                else:
                    yield _sse(chunk(cid, chat.model, {}, event.finish_reason))
                    if chat.include_usage:
                        last = chunk(cid, chat.model, {}, with_choice=False)
                        last["usage"] = usage(prompt_tokens, event.completion_tokens)
                        yield _sse(last)
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (also when the client lies about its size)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, more than this server's limit of "
                       f"{limit:,}", None, "body_too_large")  # fmt: skip
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the request body is more than this server's limit of {limit:,} bytes", None,
                           "body_too_large")  # fmt: skip
        parts.append(part)
    return b"".join(parts)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    app = create_app(config)
    print(f"phi3v serve: {', '.join(app.state.engine.names)} on http://{config.host}:{config.port}/"
          f"{'  (API key required)' if config.api_key else ''}")  # fmt: skip
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
