"""A loopback OpenAI-compatible chat-completions server standing in for the judge model.

It requires `Authorization: Bearer <key>`, can fail the first N requests with 503, and answers by
rule: `reply_for(messages)` decides the text, so tests know exactly which replies parse.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, reply_for: Callable[[list[dict]], str], *, api_key: str = "judge-test-key",
                 fail_first: int = 0, always_fail: bool = False):
        self.reply_for = reply_for
        self.api_key = api_key
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                with outer._lock:
                    outer.statuses.append(status)

            def do_POST(self):  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    return self._send(401, {"error": "bad key"})
                with outer._lock:
                    outer.requests.append(body)
                    failing = outer.always_fail or len(outer.requests) <= outer.fail_first
                if failing:
                    return self._send(503, {"error": "overloaded"}, {"Retry-After": "0"})
                text = outer.reply_for(body["messages"])
                return self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                        "choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": text}}]})

        return Handler
