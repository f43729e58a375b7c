"""`halfv-export serve`: an OpenAI-compatible HTTP server over one artifacts folder (FastAPI + uvicorn, the `serve`
extra; the CLI imports this module only for `serve`).

    POST /v1/chat/completions   one user message: text parts + at most one image_url part (a data: URL, or a
                                local path / file:// URL under a folder given with --allow-images-from); max_tokens
                                (or max_completion_tokens); stream: true -> server-sent events ending "data: [DONE]"
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok"} once the engine thread runs
    GET  /metrics               request, batch-size and token counters (JSON)

Requests go through the Batcher (serving/batcher.py): one engine thread, batches of one bucket. Decoding is greedy:
temperature / top_p other than their greedy values, n > 1, stop strings, tools and logprobs are refused with 400
rather than silently ignored. Extension: "full": true runs the unpruned graphs. Errors are OpenAI's shape,
{"error": {"message": one line, "type", "param", "code"}}, with 400 (bad request), 404 (unknown route or model),
405, 413 (body over --max-body-mib), 503 (queue full, shutting down) or 500 (engine failure).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..base.errors import BadInput
from ..base.version import VERSION
from ..base.data import image_from_bytes, load_image
from ..engines.api import Model
from .batcher import Batcher, Failed, Job, Overloaded, Started

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 4096  # as `run --max-new-tokens`
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
REFUSED = {  # parameter -> (the values that ask for nothing beyond greedy decoding, why anything else is refused)
    "n": ((1,), "this server returns one choice per request; send n 1 (or omit it)"),
    "temperature": ((0,), "decoding is greedy (the engines are validated greedily); send temperature 0 or omit it"),
    "top_p": ((1,), "decoding is greedy; send top_p 1 or omit it"),
    "logprobs": ((False,), "log-probabilities are not returned; omit logprobs"),
    "top_logprobs": ((0,), "log-probabilities are not returned; omit top_logprobs"),
    "stop": (("", []), "stop strings are not supported; omit stop"),
    "tools": (([],), "tool calls are not supported; omit tools"),
    "functions": (([],), "function calls are not supported; omit functions"),
    "presence_penalty": ((0,), "decoding is greedy; omit presence_penalty"),
    "frequency_penalty": ((0,), "decoding is greedy; omit frequency_penalty"),
}


class RequestError(Exception):
    """One bad request: the HTTP status and the body OpenAI clients parse."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        # one line whatever the client put in a name or a path it sent (a %0A in a URL path decodes to a newline)
        message = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_error", 500: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ images
class ImageSource:
    """Where request images may come from: data: URLs always; local files only under the allowed folders (symlinks
    resolved first, so a link out of an allowed folder is refused); never the network."""

    def __init__(self, allowed: list[Path]):
        self.allowed = [Path(d).resolve() for d in allowed]

    def load(self, url: str):
        if url.startswith("data:"):
            return self._data_url(url)
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme in ("http", "https", "ftp", "s3", "gs"):
            raise RequestError(f"image_url: {scheme} URLs are refused (this server does not fetch from the network); "
                               "send the image as a data:image/...;base64 URL", param="image_url")
        if scheme == "file":
            url = url[len("file://"):] if url.startswith("file://") else url[len("file:"):]
        elif scheme and len(scheme) > 1:
            raise RequestError(f"image_url: unsupported URL scheme '{scheme}:'; send a data: URL or a local path",
                               param="image_url")
        return self._local(url)

    def _data_url(self, url: str):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError("image_url: a data URL must look like data:image/png;base64,<payload>",
                               param="image_url")
        media = header[len("data:"):-len(";base64")]
        if media and not media.startswith("image/"):
            raise RequestError(f"image_url: the data URL holds '{media}', not an image", param="image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image_url: the data URL's base64 payload is malformed", param="image_url") from None
        try:
            return image_from_bytes(data, "image_url (data URL)")
        except BadInput as e:
            raise RequestError(str(e), param="image_url") from None

    def _local(self, raw: str):
        if not self.allowed:
            raise RequestError("image_url: local image paths are off on this server (start it with "
                               "--allow-images-from DIR), or send a data:image/...;base64 URL", param="image_url")
        path = Path(raw)
        if not path.is_absolute():
            raise RequestError(f"image_url: local path '{raw}' is not absolute; send an absolute path",
                               param="image_url")
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in self.allowed):
            raise RequestError(f"image_url: {raw} is outside the folders this server may read "
                               "(--allow-images-from)", param="image_url")
        try:
            return load_image(resolved)
        except BadInput as e:
            raise RequestError(str(e).replace(str(resolved), raw), param="image_url") from None


# ------------------------------------------------------------------------------------------------ requests
@dataclass
class ChatRequest:
    prompt: str
    image: object  # fitted PIL image or None
    bucket: tuple[int, int] | None
    max_tokens: int
    stream: bool
    include_usage: bool
    full: bool


class RequestParser:
    """JSON body -> ChatRequest, every problem as a RequestError naming the field. Runs in the threadpool (image
    decoding is CPU work), so the tokenizer it counts with is its own instance, which keeps the engine thread's
    apart; the lock serialises the threadpool workers on it (a HostTokenizer call sets the backend's special-token
    flag, and the Rust backend refuses a concurrent encode: "Already borrowed")."""

    def __init__(self, model: Model, served_name: str, images: ImageSource, max_model_len: int):
        from ..host.text import HostTokenizer

        self.model, self.served_name, self.images, self.max_model_len = model, served_name, images, max_model_len
        self.tokenizer = HostTokenizer(model.pipeline.artifacts)
        self.lock = threading.Lock()
        self.visual = {tuple(b["size"]): b["num_visual"] for b in model.meta["buckets"]}

    def parse(self, body) -> ChatRequest:
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object with \"messages\"")
        model = body.get("model")
        if model is not None and model != self.served_name:
            raise RequestError(f"the model '{model}' does not exist; this server serves '{self.served_name}'",
                               status=404, param="model", code="model_not_found")
        for name, (accepted, why) in REFUSED.items():
            if body.get(name) is not None and body[name] not in accepted:
                raise RequestError(f"{name}: {why}", param=name)
        response_format = body.get("response_format")
        if response_format not in (None, {"type": "text"}):
            raise RequestError("response_format: only plain text answers are produced; omit response_format",
                               param="response_format")
        prompt, url = self._messages(body.get("messages"))
        max_tokens = self._max_tokens(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream: must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options: must be an object like {\"include_usage\": true}",
                               param="stream_options")
        full = body.get("full", False)
        if not isinstance(full, bool):
            raise RequestError("full: must be true (unpruned graphs) or false (HalfV)", param="full")
        image = None
        if url is not None:
            try:
                image = self.model.image(self.images.load(url))
            except BadInput as e:
                raise RequestError(str(e), param="image_url") from None
        bucket = self.model.bucket_of(image)
        with self.lock:
            text_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        needed = text_tokens + self.visual.get(bucket, 0) + max_tokens
        if needed > self.max_model_len:
            raise RequestError(f"this request needs at least {needed} tokens ({text_tokens} text, "
                               f"{self.visual.get(bucket, 0)} image, {max_tokens} max_tokens), over the "
                               f"{self.max_model_len}-token limit (--max-model-len); shorten the prompt or lower "
                               "max_tokens", param="messages", code="context_length_exceeded")
        return ChatRequest(prompt, image, bucket, max_tokens, stream, bool(options.get("include_usage")), full)

    def _max_tokens(self, body: dict) -> int:
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        value = body.get(name)
        if value is None:
            return min(DEFAULT_MAX_TOKENS, self.max_model_len)
        limit = min(MAX_TOKENS_LIMIT, self.max_model_len)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise RequestError(f"{name}: must be an integer from 1 to {limit}, not {json.dumps(value)}", param=name)
        return value

    def _messages(self, messages) -> tuple[str, str | None]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: must be a non-empty list of {\"role\", \"content\"} objects",
                               param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RequestError(f"messages[{i}]: needs a \"role\" ({', '.join(ROLES)}) and \"content\"",
                                   param="messages")
        roles = [m["role"] for m in messages]
        if roles != ["user"]:
            raise RequestError(f"messages: this server answers exactly one user message (the chat template is applied "
                               f"to a single user turn); got {', '.join(roles)}", param="messages")
        content = messages[0].get("content")
        if isinstance(content, str):
            return content, None
        if not isinstance(content, list) or not content:
            raise RequestError("messages[0].content: must be a string or a non-empty list of parts",
                               param="messages")
        texts, urls = [], []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[0].content[{j}]"
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise RequestError(f"{where}: image_url needs {{\"url\": \"data:image/png;base64,...\"}}",
                                       param="image_url")
                urls.append(url)
            else:
                raise RequestError(f"{where}: parts are {{\"type\": \"text\", \"text\": ...}} or "
                                   f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}; got "
                                   f"{json.dumps(kind)}", param="messages")
        if len(urls) > 1:
            raise RequestError(f"messages[0].content: {len(urls)} images; the engines take one image per request",
                               param="image_url")
        return "\n".join(texts), (urls[0] if urls else None)


# ------------------------------------------------------------------------------------------------ the app
def _bridge(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """A deliver callback for the engine thread: hands events to this request's asyncio queue."""

    def deliver(event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server stopping): nobody is waiting any more
            pass

    return deliver


def create_app(model: Model, batcher: Batcher, served_name: str, images: ImageSource, max_body: int,
               max_model_len: int):
    parser = RequestParser(model, served_name, images, max_model_len)
    created = int(time.time())
    app = FastAPI(title="halfv-export", version=VERSION, docs_url=None, redoc_url=None)
    routes = "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics"

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; this server has {routes}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server has {routes}"
        else:
            message = str(e.detail)
        return JSONResponse(RequestError(message, e.status_code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return JSONResponse(RequestError(f"internal error: {e.__class__.__name__}: {first}", 500).body(),
                            status_code=500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served_name, created, model)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != served_name:
            raise RequestError(f"the model '{name}' does not exist; this server serves '{served_name}'", 404,
                               param="model", code="model_not_found")
        return _model_card(served_name, created, model)

    @app.get("/health")
    async def health():
        alive = batcher.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine thread stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return {**batcher.stats.snapshot(), "queue": batcher.depth(), "max_batch": batcher.max_batch,
                "batch_wait_ms": round(batcher.batch_wait * 1000, 3), "model": served_name}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise RequestError(f"the body is {int(declared)} bytes, over the {max_body}-byte limit (--max-body-mib); "
                               "send a smaller image", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise RequestError(f"the body is over the {max_body}-byte limit (--max-body-mib); send a smaller "
                                   "image", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def next_event(events: asyncio.Queue, request: Request, job: Job):
        """The next engine event for this job, or None once its client has gone (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        batcher.stats.add(received=1)
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
                raise RequestError(f"the body is not valid JSON ({e.__class__.__name__}: "
                                   f"{str(e).splitlines()[0][:120]})") from None
            chat = await run_in_threadpool(parser.parse, body)
        except RequestError:
            batcher.stats.add(invalid=1)
            raise
        events: asyncio.Queue = asyncio.Queue()
        job = Job(chat.image, chat.prompt, chat.max_tokens, chat.full, _bridge(asyncio.get_running_loop(), events),
                  bucket=chat.bucket)
        try:
            batcher.submit(job)
        except Overloaded as e:
            raise RequestError(str(e), 503) from None
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = await next_event(events, request, job)
        if first is None:
            return JSONResponse(RequestError("client disconnected", 499).body(), status_code=499)
        if isinstance(first, Failed):
            raise RequestError(first.message, first.status)
        started: Started = first
        halfv = {"batch_size": started.batch_size, "queued_ms": round(started.queued_s * 1000, 1),
                 "bucket": None if started.bucket is None else f"{started.bucket[0]}x{started.bucket[1]}",
                 "pruned": started.bucket is not None and not chat.full}
        head = {"id": rid, "created": now, "model": served_name, "system_fingerprint": f"halfv-export-{VERSION}"}
        if chat.stream:
            return StreamingResponse(_sse(events, job, head, started, halfv, chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Halfv-Batch-Size": str(started.batch_size)})
        text, count, finish = [], 0, None
        while finish is None:
            event = await next_event(events, request, job)
            if event is None:
                return JSONResponse(RequestError("client disconnected", 499).body(), status_code=499)
            if isinstance(event, Failed):
                raise RequestError(event.message, event.status)
            text.append(event.text)
            count += 1
            finish = event.finish_reason
        usage = {"prompt_tokens": started.prompt_tokens, "completion_tokens": count,
                 "total_tokens": started.prompt_tokens + count}
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                          "logprobs": None, "finish_reason": finish}],
                             "usage": usage, "halfv": halfv},
                            headers={"X-Halfv-Batch-Size": str(started.batch_size)})

    return app


def _model_card(name: str, created: int, model: Model) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "halfv-export",
            "halfv": {"backbone": model.backbone, "buckets": [f"{h}x{w}" for h, w in model.buckets],
                      "schedule": model.meta.get("schedule"), "device": model.describe()}}


async def _sse(events: asyncio.Queue, job: Job, head: dict, started: Started, halfv: dict, include_usage: bool):
    """OpenAI's chunk stream: a role chunk, one chunk per text piece, a finish chunk (with the halfv extension),
    optionally a usage chunk, then [DONE]. A client that disconnects cancels this generator: its job is cancelled
    and the engine drops its row at the next step."""

    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        count = 0
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                yield f"data: {json.dumps(RequestError(event.message, event.status).body())}\n\n"
                break
            count += 1
            if event.text:
                yield chunk({"content": event.text})
            if event.finish_reason:
                yield chunk({}, event.finish_reason, halfv=halfv)
                if include_usage:
                    usage = {"prompt_tokens": started.prompt_tokens, "completion_tokens": count,
                             "total_tokens": started.prompt_tokens + count}
                    yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancelled.set()


# ------------------------------------------------------------------------------------------------ running it
def build_server(artifacts: Path, target: str = "onnxruntime", ep: str = "cpu", max_batch: int = 8,
                 batch_wait_ms: float = 10.0, allow_images_from: tuple = (), max_body_mib: float = 20.0,
                 max_queue: int = 256, served_name: str | None = None, max_model_len: int | None = None):
    """Open the artifacts (manifest checked) and return (app, batcher, served name); the caller runs uvicorn."""
    from ..engines.api import load

    for folder in allow_images_from:
        if not Path(folder).is_dir():
            raise BadInput(f"--allow-images-from {folder} is not a folder; pass a folder the server may read images "
                           "from")
    model = load(artifacts, target=target, ep=ep)
    limit = min(model.context or 8192, 8192) if max_model_len is None else max_model_len
    if model.context is not None and limit > model.context:
        raise BadInput(f"--max-model-len {limit} is over the model's {model.context}-token context")
    model.warm_up()
    name = served_name or f"{model.backbone}-halfv"
    batcher = Batcher(model, max_batch=max_batch, batch_wait=batch_wait_ms / 1000, max_queue=max_queue)
    app = create_app(model, batcher, name, ImageSource(list(allow_images_from)), int(max_body_mib * 1024 * 1024),
                     limit)
    return app, batcher, name


class Server:
    """uvicorn on a socket bound here (so a taken port is one line, and port 0 picks a free one), with the engine
    thread started before the first request and stopped after the last."""

    def __init__(self, app, batcher: Batcher, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
        import socket

        import uvicorn

        self.batcher = batcher
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise BadInput(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                                    timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Block until SIGINT / SIGTERM (uvicorn's handlers), then stop the engine thread."""
        self.batcher.start()
        try:
            self.server.run(sockets=[self.sock])
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down on
            pass
        finally:
            self.batcher.stop()
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve from a background thread (tests, notebooks); returns once the server accepts connections."""
        self.batcher.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="halfv-http")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(15)
        self.batcher.stop()
        self.sock.close()

