"""A real HTTP teacher on 127.0.0.1 for tests: an OpenAI-compatible `/v1/chat/completions`.

It answers the way a well-behaved GPT teacher would, by reading the prompt it is sent: the task type
from the system message, the captions and `category: [x1, y1, x2, y2]` lines from the last user
message; the reply is written by the rule-based teacher from those symbols. Tests script failures
per query (keyed by the first caption): a list of actions consumed one per request, each one of
"ok", "429", "429-retry-after", "500", "503", "400", "malformed", "garbage-json", "slow".
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llava.datagen.rule_teacher import RuleTeacher

# Chatty preamble before the format: unusable for every task type (the parser says unexpected_block).
MALFORMED_REPLY = "Sure! Here is what I see.\nQuestion:\nWhat is in the picture?\n"
BOX = re.compile(r"^(.+?): \[([^\]]+)\]$")


def record_from_query(query: str) -> dict[str, Any]:
    captions, instances = [], []
    for line in query.splitlines():
        match = BOX.match(line.strip())
        if match:
            instances.append({"category": match.group(1), "bbox": [float(v) for v in match.group(2).split(",")]})
        elif line.strip():
            captions.append(line.strip())
    return {"id": captions[0] if captions else "", "captions": captions, "instances": instances}


class TeacherServer:
    def __init__(self, api_key: str = "sk-test", system_to_type: dict[str, str] | None = None):
        self.api_key = api_key
        self.system_to_type = system_to_type or {}
        self.plans: dict[str, list[str]] = defaultdict(list)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.slow_s = 0.3
        self.teacher = RuleTeacher(noun="object")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> TeacherServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def plan(self, first_caption: str, *actions: str) -> None:
        self.plans[first_caption].extend(actions)

    def task_type(self, system: str) -> str:
        for text, task in self.system_to_type.items():
            if system.strip() == text.strip():
                return task
        raise ValueError("unknown system message")

    def respond(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        messages = body["messages"]
        query = messages[-1]["content"]
        record = record_from_query(query)
        with self.lock:
            self.requests.append(body)
            plan = self.plans.get(record["id"])
            action = plan.pop(0) if plan else "ok"
        if action == "slow":
            time.sleep(self.slow_s)
            action = "ok"
        if action in ("429", "500", "503", "400"):
            return int(action), {}, json.dumps({"error": {"message": f"scripted {action}"}}).encode()
        if action == "429-retry-after":
            return 429, {"Retry-After": "0.05"}, b'{"error": {"message": "slow down"}}'
        if action == "garbage-json":
            return 200, {}, b"<html>not json</html>"
        task = self.task_type(messages[0]["content"])
        text = MALFORMED_REPLY if action == "malformed" else self.teacher.reply(record, task)
        reply = {"id": "cmpl-test", "object": "chat.completion", "model": body.get("model"),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}]}
        return 200, {}, json.dumps(reply).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {}, b'{"error": {"message": "not found"}}')
                    return
                if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {}, b'{"error": {"message": "bad key"}}')
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, headers, payload = server.respond(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self._send(status, headers, payload)

            def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
