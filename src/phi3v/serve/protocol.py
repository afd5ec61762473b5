"""OpenAI's chat-completions schema in and out: request checks that name the field, and the response objects.

A request becomes a ``ChatRequest``: a phi3v ``Conversation`` (images decoded to PIL) and the sampling settings.
Every problem raises ``ApiError`` with the HTTP status and OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), so a client sees which field was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from phi3v.processing import Conversation, Turn
from phi3v.serve.config import ServeConfig


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip


@dataclass
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body."""

    model: str
    conversation: Conversation
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", param=None, code="invalid_json") from err
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def parse_chat_request(body: dict, models: list[str], config: ServeConfig) -> ChatRequest:
    """Check a chat-completions body and decode its images.

    Args:
        body: The parsed JSON body.
        models: The names the server serves (the base first).
        config: The limits.

    Raises:
        ApiError: naming the field at fault.
    """
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model not in models:
        raise ApiError(404, f"model '{model}' does not exist; this server has {models}", "model", "model_not_found")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {n!r}", "n")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{name}' must be a positive integer, got {max_tokens!r}", name)
    if max_tokens > config.max_tokens:
        raise ApiError(400, f"'{name}' is {max_tokens}, more than this server's limit of {config.max_tokens}", name)
    temperature = _number(body, "temperature", config.default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to 4 of them, got {stop!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    conversation = _conversation(body.get("messages"), config)
    return ChatRequest(model, conversation, max_tokens, temperature, top_p, stop, seed, stream,
                       bool(options.get("include_usage", False)))  # fmt: skip


def _typed(body: dict, key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}, got {value!r}", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}", key)
    return float(value)


def _conversation(messages: Any, config: ServeConfig) -> Conversation:
    """OpenAI messages as phi3v turns: system messages join the system prompt; each user run (with its images)
    ends at the assistant's reply; the last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[Turn] = []
    texts: list[str] = []
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_only(message.get("content"), f"{where}.content"))
        elif role == "user":
            part_texts, part_images = _user_content(message.get("content"), f"{where}.content", config)
            texts += part_texts
            images += part_images
        elif role == "assistant":
            if not texts and not images:
                raise ApiError(400, f"'{where}': an assistant message must follow a user message", where)
            turns.append(Turn("\n".join(texts), images, _text_only(message.get("content"), f"{where}.content")))
            texts, images = [], []
        else:
            raise ApiError(400, f"'{where}.role' must be system, user or assistant, got {role!r}", f"{where}.role")
        count = sum(len(t.images) for t in turns) + len(images)
        if count > config.max_images:
            raise ApiError(400, f"'{where}': {count} images, more than this server's limit of {config.max_images}",
                           f"{where}.content")  # fmt: skip
    if not texts and not images:
        raise ApiError(400, "'messages': the last message must be the user's", "messages")
    turns.append(Turn("\n".join(texts), images))
    return Conversation(turns, "\n".join(system) if system else None)


def _text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(_string(p.get("text"), f"{where}[{k}].text") for k, p in enumerate(content))
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", where)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"'{where}' must be a string", where)
    return value


def _user_content(content: Any, where: str, config: ServeConfig) -> tuple[list[str], list[Image.Image]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"'{where}' must be a string or a list of parts", where)
    texts, images = [], []
    for k, part in enumerate(content):
        here = f"{where}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_string(part.get("text"), f"{here}.text"))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(load_image_url(_string(url, f"{here}.image_url.url"), f"{here}.image_url.url", config))
        else:
            raise ApiError(400, f"'{here}.type' must be 'text' or 'image_url', got {kind!r}", f"{here}.type")
    return texts, images


def load_image_url(url: str, where: str, config: ServeConfig) -> Image.Image:
    """A ``data:`` URL's image, or a ``file://`` one's when local files are allowed; remote URLs are refused
    (never fetched)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"'{where}': only base64 data URLs are accepted (data:image/png;base64,...)", where)
        if len(payload) * 3 // 4 > config.max_image_bytes:
            raise ApiError(413, f"'{where}': the image is about {len(payload) * 3 // 4:,} bytes, more than this "
                           f"server's limit of {config.max_image_bytes:,}", where, "image_too_large")  # fmt: skip
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"'{where}': the data URL is not valid base64 ({err})", where, "invalid_image") from err
        return _decode(data, where, config)
    if scheme == "file":
        if not config.allow_local_files:
            raise ApiError(400, f"'{where}': local files are refused (start the server with --allow-local-files)",
                           where, "local_file_refused")  # fmt: skip
        path = Path(unquote(urlparse(url).path))
        if not path.is_file():
            raise ApiError(400, f"'{where}': {path} is not a file", where, "invalid_image")
        if os.path.getsize(path) > config.max_image_bytes:
            raise ApiError(413, f"'{where}': {path} is {os.path.getsize(path):,} bytes, more than this server's "
                           f"limit of {config.max_image_bytes:,}", where, "image_too_large")  # fmt: skip
        return _decode(path.read_bytes(), where, config)
    if scheme in ("http", "https", "ftp"):
        raise ApiError(400, f"'{where}': remote image URLs are not fetched; send the image as a data URL "
                       "(data:image/png;base64,...)", where, "remote_url_refused")  # fmt: skip
    raise ApiError(400, f"'{where}' must be a data URL (data:image/...;base64,...), got {url[:40]!r}", where)


def _decode(data: bytes, where: str, config: ServeConfig) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: refuse a huge image before decoding it
            if width * height > config.max_image_pixels:
                raise ApiError(413, f"'{where}': the image is {width}x{height} pixels, more than this server's limit "
                               f"of {config.max_image_pixels:,}", where, "image_too_large")  # fmt: skip
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(400, f"'{where}': the image does not decode ({err})", where, "invalid_image") from err


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """A ``chat.completion`` object."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }  # fmt: skip


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, with_choice: bool = True) -> dict:
    """A ``chat.completion.chunk`` object (a streamed piece)."""
    choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if with_choice else []
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
