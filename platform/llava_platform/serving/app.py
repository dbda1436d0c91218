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
from llava_platform.serving.openapi import describe_api
from llava_platform.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    parse_reload_body,
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
    # Starlette puts the route's methods in the 405's Allow header (RFC 9110 requires it).
    return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


describe_api(api)  # request bodies and error responses in /openapi.json (the routes read raw bodies)


def _model_error(err: dict[str, Any], retry_after_s: int = 1) -> APIError:
    kind = "server_error" if err["status"] >= 500 else "invalid_request_error"
    headers = {"Retry-After": str(retry_after_s)} if err["status"] == 503 else None
    return APIError(err["status"], err["message"], type=kind, param=err.get("param"), code=err.get("code"),
                    headers=headers)


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


def _wants_json_object(req: ChatCompletionRequest) -> bool:
    """json_object is decoded under a JSON constraint; json_schema is refused rather than ignored."""
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        raise APIError(400, "response_format json_schema is not supported by this server (its constrained "
                            "decoding knows JSON, not schemas); use {\"type\": \"json_object\"}",
                       param="response_format", code="unsupported_parameter")
    return fmt is not None and fmt.type == "json_object"


def _token_bias(req: ChatCompletionRequest) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    out = {}
    for key, value in req.logit_bias.items():
        if not key.isdigit() or len(key) > 12:
            raise APIError(400, f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias",
                           code="invalid_value")
        out[int(key)] = float(value)
    return out


# Helpers the deployment calls are defined above it: Serve serialises the class when decorated.
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
        self.lagging: dict[str, Any] | None = None  # the reload this replica failed to apply so far
        self._following: asyncio.Task | None = None
        runtime_cfg = self.cfg.model_copy(update={"model_uri": record.model_uri}) if record else self.cfg
        self.model = ModelRuntime(runtime_cfg)

    async def check_health(self) -> None:
        await self.model.check_health()
        record = await asyncio.to_thread(reload_broadcast.latest, self.reload_token)
        if record is not None and record.id != self.applied_reload and self._following is None:
            self._following = asyncio.get_running_loop().create_task(self._follow(record))

    async def _follow(self, record: reload_broadcast.ReloadRecord) -> None:
        """Apply another replica's reload, then mark it applied; retry a failed load with back-off.

        Until the load succeeds, /readyz answers 503 naming the reload and the last error (the
        replica keeps serving its current model meanwhile). After the retries, the next health
        check starts another round, so a replica never stays behind silently."""
        m = self.cfg.model
        try:
            for attempt in range(m.reload_retries + 1):
                try:
                    await self.model.reload(record.model_uri, record.force)
                except Exception as err:  # keep the replica up on the old model and try again
                    self.metrics.reload_failures.inc()
                    self.lagging = {"reload": record.id, "model_uri": record.model_uri, "attempts": attempt + 1,
                                    "error": f"{type(err).__name__}: {err}"[:300]}
                    log.warning("following reload %s to %s failed (attempt %d): %s", record.id, record.model_uri,
                                attempt + 1, err)
                    await asyncio.sleep(m.reload_backoff_s * 2**attempt)
                    continue
                self.applied_reload, self.lagging = record.id, None
                return
        finally:
            self._following = None

    # ------------------------------------------------------------------------------------ probes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """vLLM's and TGI's liveness path, for clients and probes written against them."""
        return {"status": "ok"}

    @api.get("/ping")
    async def ping(self) -> dict[str, str]:
        """SageMaker's liveness path (with /invocations)."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> Response:
        # A replica only takes traffic once __init__ has loaded the model; while none has, Serve's
        # proxy answers 503 itself. A replica behind the fleet's latest reload is not ready either.
        version = self.model.info()["version"]
        if self.lagging is not None:
            return JSONResponse({"status": "lagging", "version": version, "behind": self.lagging}, status_code=503)
        if self.model.unavailable:
            return JSONResponse({"status": "reloading", "version": version, "reason": self.model.unavailable},
                                status_code=503)
        return JSONResponse({"status": "ready", "version": version})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        self.metrics.observe_replica(self.model.bundle.engine, self.model.info())
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
        body = parse_reload_body(await self._body(request, required=False))
        uri, force = body.model_uri, body.force
        self.reload_guard.check_uri(uri)
        before = self.model.info()
        try:
            result = await self.model.reload(uri, force)
        except (ValueError, OSError) as err:  # ModelURIError from resolution, a directory that does not load
            # The detail (cache and model paths of this server) goes to the log, not to the caller.
            log.warning("reload to %s failed: %s", uri or self.model.model_uri, err)
            raise APIError(400, f"cannot reload {uri or self.model.model_uri!r}: it does not resolve to a loadable "
                                "model (details in the server log)", param="model_uri",
                           code="invalid_model_uri") from None
        result = {k: v for k, v in result.items() if k not in ("model_dir", "pid")}
        self.reload_guard.record(who, before, result)
        if result["changed"] or uri:
            # The other replicas follow on their next health check.
            record = reload_broadcast.ReloadRecord.new(self.model.model_uri, force)
            self.applied_reload = record.id
            await asyncio.to_thread(reload_broadcast.publish, self.reload_token, record)
        return result | {"other_replicas_within_s": self.cfg.model.health_check_period_s}

    @api.post("/invocations")
    async def invocations(self, request: Request) -> Response:
        """SageMaker-style alias of chat completions (vLLM serves it too)."""
        return await self.chat_completions(request)

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

    async def _body(self, request: Request, required: bool = True) -> bytes:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and (required or content_type):
            raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                           code="unsupported_media_type")
        limit = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        return raw

    async def _prepare(self, req: ChatCompletionRequest, raw_len: int) -> dict[str, Any]:
        if req.model and req.model != self.cfg.served_model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.cfg.served_model_name!r}", param="model", code="model_not_found")
        limits = self.cfg.limits
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:
            max_tokens = limits.default_max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                           param="min_tokens", code="invalid_value")
        if req.choices() > limits.max_n:
            raise APIError(400, f"n must be between 1 and {limits.max_n}, got {req.choices()}", param="n",
                           code="invalid_value")
        json_object = _wants_json_object(req)
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
        return {"messages": messages, "max_new_tokens": max_tokens, "temperature": req.sampling_temperature(),
                "top_p": req.sampling_top_p(), "stop": stops, "seed": req.seed, "n": req.choices(),
                "top_logprobs": req.wants_logprobs(), "logit_bias": _token_bias(req), "min_tokens": req.min_tokens,
                "json_object": json_object}

    async def _complete(self, req: ChatCompletionRequest, item: dict[str, Any]) -> JSONResponse:
        out = await self.model.generate(item)
        if "error" in out:
            raise _model_error(out["error"], self.cfg.retry_after_s)
        results = out["results"]
        self.metrics.prompt_tokens.inc(results[0]["prompt_tokens"])
        self.metrics.completion_tokens.inc(sum(r["completion_tokens"] for r in results))
        self.metrics.batch_size.observe(out["batch_size"])
        self.metrics.generate_seconds.observe(out["compute_s"])
        body = completion_body(completion_id(), self.cfg.served_model_name, f"llava-{out['version']}", results)
        return JSONResponse(body)

    async def _stream(self, req: ChatCompletionRequest, item: dict[str, Any]) -> Response:
        events = self.model.stream(item)
        first = await events.__anext__()
        if "error" in first:  # rejected before any text: a plain 4xx, not a broken stream
            raise _model_error(first["error"], self.cfg.retry_after_s)
        return StreamingResponse(
            self._sse(events, f"llava-{first['version']}", req, first["prompt_tokens"]),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(self, events: Any, fingerprint: str, req: ChatCompletionRequest, prompt_tokens: int):
        cid, created, model = completion_id(), int(time.time()), self.cfg.served_model_name
        options = req.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        generated = [0] * req.choices()

        def chunk(i: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> bytes:
            body = chunk_body(cid, model, fingerprint, delta, finish, created, index=i, logprobs=logprobs)
            if continuous:  # vLLM's extension: the running usage on every chunk
                body["usage"] = usage(prompt_tokens, sum(generated))
            return sse(body)

        for i in range(req.choices()):
            yield chunk(i, {"role": "assistant", "content": ""}, None)
        try:
            async for ev in events:
                if "error" in ev:
                    yield sse(_model_error(ev["error"]).body())
                    break
                i = ev["index"]
                generated[i] = ev["completion_tokens"]
                if ev["finish_reason"] is None:
                    yield chunk(i, {"content": ev["delta"]}, None, ev["logprobs"])
                    continue
                self.metrics.completion_tokens.inc(ev["completion_tokens"])
                yield chunk(i, {"content": ev["delta"]}, ev["finish_reason"], ev["logprobs"])
            else:
                self.metrics.prompt_tokens.inc(prompt_tokens)
                if include_usage:
                    final = chunk_body(cid, model, fingerprint, {}, None, created)
                    final["choices"] = []
                    final["usage"] = usage(prompt_tokens, sum(generated))
                    yield sse(final)
        finally:
            await events.aclose()  # client disconnected or done: the rows leave the running batch
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
