"""The Ray Serve application: one deployment whose replicas serve the OpenAI-compatible API and hold the model.

Import path for Serve config files and KubeRay `serveConfigV2`:

    applications:
      - name: llava
        import_path: llava_platform.serving.app:build_app
        args: {model_uri: "models:/llava@champion", auth: {api_key_env: LLAVA_API_KEY}}

Each replica checks everything that needs no weights first (auth, JSON and schema validation,
image decoding and limits), so bad input never reaches the model; then the replica's
`ModelRuntime` checks what needs the tokenizer (context length) and generates with continuous
batching. API and model share the replica because a separate ingress deployment costs a second
actor hop per request (serialising the decoded images); it measured slower on CPU at every
concurrency (benchmarks/README.md, Serving). Back-pressure is Serve's: `max_ongoing_requests`
per replica, `max_queued_requests` at each proxy, beyond that 503 with `Retry-After`.
"""


import asyncio
import functools
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_platform.serving import chat_page, reload_broadcast
from llava_platform.serving.auth import ReloadGuard, check_bearer, load_api_key
from llava_platform.serving.config import ServeConfig, parse_serve_config
from llava_platform.serving.images import RemotePolicy, to_generation_messages
from llava_platform.serving.metrics import ServingMetrics
from llava_platform.serving.model import ModelRuntime
from llava_platform.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    parse_request,
    sse,
    usage,
)

log = logging.getLogger("llava.serving")

INLINE_DECODE_BYTES = 256 * 1024

api = FastAPI(title="llava-platform OpenAI-compatible API", docs_url=None, redoc_url=None)
api.include_router(chat_page.router)  # the chat page at /ui, a client of this same API


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)


def _model_error(err: dict[str, Any]) -> APIError:
    kind = "server_error" if err["status"] >= 500 else "invalid_request_error"
    return APIError(err["status"], err["message"], type=kind, param=err.get("param"), code=err.get("code"))


def _check_turns(req: ChatCompletionRequest) -> None:
    """The chat templates render an optional system message then alternating user/assistant turns
    ending on a user turn (the one being answered); anything else would silently garble the prompt."""
    roles = [m.role for m in req.messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != "user":
        raise APIError(400, "messages must be an optional system message, then alternating user/assistant "
                            f"turns ending with a user turn; got roles {roles}", param="messages",
                       code="invalid_messages")


@serve.deployment(name="LlavaServer")
@serve.ingress(api)
class LlavaServer:
    def __init__(self, args: dict[str, Any], reload_token: str):
        self.cfg: ServeConfig = parse_serve_config(args)
        self.api_key = load_api_key(self.cfg.auth)  # fails the replica if auth is on but the key is missing
        self.reload_guard = ReloadGuard(self.cfg.auth, self.cfg.model_uri)
        self.metrics = ServingMetrics()
        self.remote = RemotePolicy(self.cfg.allow_remote_images, self.cfg.remote_image_timeout_s,
                                   self.cfg.remote_image_private_hosts)
        self.reload_token = reload_token
        record = reload_broadcast.latest(reload_token)  # a replica started after a reload serves its model
        self.applied_reload = record.id if record else None
        runtime_cfg = self.cfg.model_copy(update={"model_uri": record.model_uri}) if record else self.cfg
        self.model = ModelRuntime(runtime_cfg)

    async def check_health(self) -> None:
        await self.model.check_health()
        record = await asyncio.to_thread(reload_broadcast.latest, self.reload_token)
        if record is not None and record.id != self.applied_reload:
            self.applied_reload = record.id
            asyncio.get_running_loop().create_task(self._follow(record))

    async def _follow(self, record: reload_broadcast.ReloadRecord) -> None:
        try:
            await self.model.reload(record.model_uri, record.force)
        except Exception as err:  # the next health check must still run: keep the replica up on the old model
            log.warning("following reload %s to %s failed: %s", record.id, record.model_uri, err)

    # ------------------------------------------------------------------------------------ probes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        # A replica only takes traffic once __init__ has loaded the model; while none has, Serve's
        # proxy answers 503 itself.
        return {"status": "ready", "version": self.model.info()["version"]}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        engine = self.model.bundle.engine
        self.metrics.engine_decoding.set(engine.decoding)
        self.metrics.engine_waiting.set(engine.waiting)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------------------------------ API

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        check_bearer(self.api_key, request.headers.get("authorization"))
        info = self.model.info()
        return {"object": "list", "data": [{
            "id": self.cfg.served_model_name, "object": "model", "created": int(info["loaded_at"]),
            "owned_by": "llava-platform", "root": info["model_uri"], "version": info["version"],
        }]}

    @api.post("/admin/reload")
    async def reload(self, request: Request) -> dict[str, Any]:
        """Re-resolve the model URI (or switch to the one given) and hot-swap the weights."""
        who = self.reload_guard.caller(request.headers.get("authorization"),
                                       request.client.host if request.client else None)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
            uri = body.get("model_uri") if isinstance(body, dict) else None
        except json.JSONDecodeError:
            raise APIError(400, "reload body must be JSON, e.g. {\"model_uri\": \"models:/llava@champion\"}",
                           code="invalid_json") from None
        force = bool(body.get("force", False))
        self.reload_guard.check_uri(uri)
        before = self.model.info()
        try:
            result = await self.model.reload(uri, force)
        except ValueError as err:  # ModelURIError from resolution
            raise APIError(400, f"cannot reload: {err}", param="model_uri", code="invalid_model_uri") from None
        self.reload_guard.record(who, before, result)
        if result["changed"] or uri:
            # The other replicas follow on their next health check.
            record = reload_broadcast.ReloadRecord.new(self.model.model_uri, force)
            self.applied_reload = record.id
            await asyncio.to_thread(reload_broadcast.publish, self.reload_token, record)
        return result | {"other_replicas_within_s": self.cfg.model.health_check_period_s}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        stream = False
        self.metrics.in_flight.inc()
        try:
            check_bearer(self.api_key, request.headers.get("authorization"))
            raw = await self._body(request)
            req = parse_request(raw)
            stream = req.stream
            item = await self._prepare(req, len(raw))
            response = await (self._stream(req, item) if stream else self._complete(req, item))
            self.metrics.requests.labels(status=str(response.status_code), stream=str(stream)).inc()
            return response
        except APIError as err:
            self.metrics.requests.labels(status=str(err.status), stream=str(stream)).inc()
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(stream=str(stream)).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------------------------ helpers

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        return raw

    async def _prepare(self, req: ChatCompletionRequest, raw_len: int) -> dict[str, Any]:
        if req.model != self.cfg.served_model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.cfg.served_model_name!r}", param="model", code="model_not_found")
        limits = self.cfg.limits
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:
            max_tokens = limits.default_max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        _check_turns(req)
        stops = req.stop_list()
        if len(stops) > limits.max_stop_sequences or any(not s for s in stops):
            raise APIError(400, f"stop must hold at most {limits.max_stop_sequences} non-empty strings",
                           param="stop", code="invalid_value")
        decode = functools.partial(to_generation_messages, req, limits, self.remote)
        # Large images and remote fetches go to a worker thread so other requests keep flowing; small
        # inline images decode in well under a millisecond, less than the thread hand-off costs.
        if raw_len > INLINE_DECODE_BYTES or self.cfg.allow_remote_images:
            messages = await asyncio.to_thread(decode)
        else:
            messages = decode()
        return {"messages": messages, "max_new_tokens": max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "stop": stops, "seed": req.seed}

    async def _complete(self, req: ChatCompletionRequest, item: dict[str, Any]) -> JSONResponse:
        out = await self.model.generate(item)
        if "error" in out:
            raise _model_error(out["error"])
        res = out["result"]
        self.metrics.prompt_tokens.inc(res["prompt_tokens"])
        self.metrics.completion_tokens.inc(res["completion_tokens"])
        self.metrics.batch_size.observe(out["batch_size"])
        self.metrics.generate_seconds.observe(out["compute_s"])
        body = completion_body(completion_id(), self.cfg.served_model_name, f"llava-{out['version']}", res)
        return JSONResponse(body)

    async def _stream(self, req: ChatCompletionRequest, item: dict[str, Any]) -> Response:
        events = self.model.stream(item)
        first = await events.__anext__()
        if "error" in first:  # rejected before any text: a plain 4xx, not a broken stream
            raise _model_error(first["error"])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            self._sse(events, f"llava-{first['version']}", include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(self, events: Any, fingerprint: str, include_usage: bool):
        cid, created, model = completion_id(), int(time.time()), self.cfg.served_model_name
        yield sse(chunk_body(cid, model, fingerprint, {"role": "assistant", "content": ""}, None, created))
        try:
            async for ev in events:
                if "error" in ev:
                    yield sse(_model_error(ev["error"]).body())
                    break
                if ev["delta"]:
                    yield sse(chunk_body(cid, model, fingerprint, {"content": ev["delta"]}, None, created))
                if ev["finish_reason"] is not None:
                    self.metrics.prompt_tokens.inc(ev["prompt_tokens"])
                    self.metrics.completion_tokens.inc(ev["completion_tokens"])
                    yield sse(chunk_body(cid, model, fingerprint, {}, ev["finish_reason"], created))
                    if include_usage:
                        final = chunk_body(cid, model, fingerprint, {}, None, created)
                        final["choices"] = []
                        final["usage"] = usage(ev["prompt_tokens"], ev["completion_tokens"])
                        yield sse(final)
        finally:
            await events.aclose()  # client disconnected or done: the row leaves the running batch
        yield sse("[DONE]")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder: `args` is a ServeConfig mapping (at least `model_uri`)."""
    cfg = parse_serve_config(args)
    m = cfg.model
    opts: dict[str, Any] = {
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "ray_actor_options": m.resources.ray_actor_options(),
        "health_check_period_s": m.health_check_period_s,
        "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s,
        "logging_config": {"enable_access_log": cfg.access_log},
    }
    if m.autoscaling is not None:
        opts["autoscaling_config"] = m.autoscaling.model_dump(exclude_none=True)
    else:
        opts["num_replicas"] = m.num_replicas
    return LlavaServer.options(**opts).bind(cfg.model_dump(mode="json"), reload_broadcast.new_token())
