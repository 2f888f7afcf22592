"""A stand-in for an OpenAI-compatible chat-completions server on 127.0.0.1, answering by a rule.

The rule: "yes" when the description names the instruction's object (its last two words, e.g. "green
ball"), else "no". `mode` makes it slow (past the client's timeout), malformed, or failing (5xx or 401),
for every request or only the first `fail_first` ones. It records every request's Authorization header
and prompt, and the most requests it ever had in flight at once (each is held for `hold` seconds, so that
concurrent ones overlap).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def rule(prompt: str) -> str:
    instruction = re.search(r"Instruction: (.*?)\. What", prompt).group(1).strip()
    description = re.search(r"observes: (.*) Was the", prompt).group(1)
    target = " ".join(instruction.split()[-2:])
    return "yes" if target in description else "no"


class StubLLM:
    def __init__(self, mode: str = "rule", hold: float = 0.0, fail_first: int | None = None):
        self.mode, self.hold, self.fail_first = mode, hold, fail_first
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at shutdown: slow handlers stop waiting
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                stub.handle(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append({"path": handler.path, "authorization": handler.headers.get("Authorization"),
                                  "body": body})
            number = len(self.requests)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.release.wait(self.hold)
            failing = self.fail_first is None or number <= self.fail_first
            status, payload = self.answer(body["messages"][0]["content"], self.mode if failing else "rule")
        finally:
            # Out of flight before the reply is written: once the client has it, it may send the next
            # request at once, and that one must not find this one still counted.
            with self.lock:
                self.in_flight -= 1
        handler.send_response(status)
        if payload is not None:
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if payload is not None:
            handler.wfile.write(payload)

    def answer(self, prompt: str, mode: str) -> tuple[int, bytes | None]:
        if mode == "slow":
            self.release.wait(5.0)  # far past the client's timeout
        if mode in ("error500", "unauthorized"):
            return (500 if mode == "error500" else 401), None
        text = {"rule": rule(prompt), "slow": rule(prompt), "malformed": "I think the agent did it"}.get(mode)
        payload = b"<html>not json</html>" if mode == "not_json" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        return 200, payload

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
