"""Client for a teacher model behind an OpenAI-compatible `/chat/completions` endpoint.

Bounded concurrency (a semaphore), per-request timeouts, and retries with exponential back-off on
429 and 5xx (and on connection errors and timeouts), honouring `Retry-After` when the server sends
one. The API key is read from a named environment variable so it never sits in a config file.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class TeacherError(RuntimeError):
    """The teacher could not produce a reply (HTTP error, retries exhausted, bad response body)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TeacherSettings:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    temperature: float = 0.2
    max_tokens: int = 1024


@dataclass
class TeacherResult:
    key: Any
    text: str | None = None
    error: str | None = None
    attempts: int = 0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date. None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class TeacherClient:
    """Async chat-completions client. Use `complete_many` from synchronous code."""

    def __init__(self, settings: TeacherSettings, *, sleep: Callable[[float], Any] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self._sleep = sleep or asyncio.sleep
        self._transport = transport
        self.api_key = self._read_key(settings.api_key_env)

    @staticmethod
    def _read_key(env_name: str | None) -> str | None:
        if not env_name:
            return None
        key = os.environ.get(env_name)
        if not key:
            raise TeacherError(f"missing_api_key: environment variable {env_name} is not set "
                               "(set teacher.api_key_env to empty only for servers without auth)")
        return key

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.backoff_max_s)
        # Full jitter keeps many workers from retrying in lock-step after a shared 429.
        return random.uniform(0, min(s.backoff_max_s, s.backoff_base_s * 2 ** attempt))

    async def complete(self, client: httpx.AsyncClient, messages: list[dict[str, Any]]) -> tuple[str, int]:
        """One chat completion with retries; returns (reply text, attempts used)."""
        s = self.settings
        body = {"model": s.model, "messages": messages, "temperature": s.temperature, "max_tokens": s.max_tokens}
        last = "no attempt made"
        for attempt in range(s.max_retries + 1):
            retry_after = None
            try:
                response = await client.post("chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last = f"transport_error: {type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return self._reply_text(response), attempt + 1
                last = f"http_{response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRY_STATUS:
                    raise TeacherError(last)
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            if attempt < s.max_retries:
                delay = self._backoff(attempt, retry_after)
                log.info("teacher retry %d/%d in %.2fs after %s", attempt + 1, s.max_retries, delay, last[:80])
                await self._sleep(delay)
        raise TeacherError(f"retries_exhausted: {s.max_retries + 1} attempts, last {last}")

    @staticmethod
    def _reply_text(response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise TeacherError(f"bad_response: no choices[0].message.content ({type(err).__name__})") from None
        if not isinstance(content, str):
            raise TeacherError("bad_response: message content is not a string")
        return content

    def _client(self) -> httpx.AsyncClient:
        s = self.settings
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
        return httpx.AsyncClient(base_url=s.base_url.rstrip("/") + "/", headers=headers,
                                 timeout=httpx.Timeout(s.timeout_s), limits=limits, transport=self._transport)

    async def complete_all(self, jobs: Sequence[tuple[Any, list[dict[str, Any]]]],
                           on_result: Callable[[TeacherResult], None] | None = None) -> list[TeacherResult]:
        """Run (key, messages) jobs with at most `concurrency` in flight; results in input order."""
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def run_one(client: httpx.AsyncClient, key: Any, messages: list[dict[str, Any]]) -> TeacherResult:
            async with gate:
                try:
                    text, attempts = await self.complete(client, messages)
                    result = TeacherResult(key, text=text, attempts=attempts)
                except TeacherError as err:
                    result = TeacherResult(key, error=err.reason)
            if on_result is not None:
                on_result(result)
            return result

        async with self._client() as client:
            return list(await asyncio.gather(*(run_one(client, k, m) for k, m in jobs)))

    def complete_many(self, jobs: Sequence[tuple[Any, list[dict[str, Any]]]],
                      on_result: Callable[[TeacherResult], None] | None = None) -> list[TeacherResult]:
        return asyncio.run(self.complete_all(jobs, on_result))
