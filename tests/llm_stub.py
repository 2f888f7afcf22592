"""A stand-in for an OpenAI-compatible chat-completions server on 127.0.0.1, answering by a rule.

The loose rule (`rule`, the tests' default): "yes" when the description names the instruction's object (its
last two words, e.g. "green ball"), else "no". The strict one (`babyai_rule`, for the language-model reward
benchmark): "yes" exactly when BabyAI's verifier would count a GoTo or PickUp instruction achieved from the
final view the built-in describer phrases. Run as a server: `python tests/llm_stub.py --rule babyai --port 8765`.

`mode` makes it slow (past the client's timeout), malformed, or failing (5xx or 401), for every request or
only the first `fail_first` ones. It records every request's Authorization header and prompt, and the most
requests it ever had in flight at once (each is held for `hold` seconds, so that concurrent ones overlap).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def rule(prompt: str) -> str:
    instruction = re.search(r"Instruction: (.*?)\. What", prompt).group(1).strip()
    description = re.search(r"observes: (.*) Was the", prompt).group(1)
    target = " ".join(instruction.split()[-2:])
    return "yes" if target in description else "no"


COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")
# an instruction's object: "the red ball", "a ball", "a purple object" (minigrid's ObjDesc.surface)
TARGET = re.compile(r"^(go to|pick up) (?:the|a) (?:(%s) )?(\w+)$" % "|".join(COLOURS))
# an object phrase of the describer: "a red key", "an open blue door"
PHRASE = r"an? (?:open |closed |locked )?(?:(%s) )?(\w+)" % "|".join(COLOURS)


def babyai_rule(prompt: str) -> str:
    """"yes" when the final view meets the instruction as BabyAI's verifier does: for "go to X", the object
    right in front of the agent ("... 1 step forward.", nothing lateral) matches X; for "pick up X", the
    carried object matches X. X's colour and type each match anything when the instruction leaves them out."""
    instruction = re.search(r"Instruction: (.*?)\. What", prompt).group(1).strip()
    description = re.search(r"observes: (.*) Was the", prompt).group(1)
    target = TARGET.match(instruction)
    if target is None:
        raise ValueError(f"babyai_rule judges GoTo and PickUp instructions only, got {instruction!r}")
    verb, colour, kind = target.groups()
    where = rf"You see {PHRASE} 1 step forward\." if verb == "go to" else rf"You carry {PHRASE}\."
    for seen_colour, seen_kind in re.findall(where, description):
        if (colour is None or colour == seen_colour) and kind in ("object", seen_kind):
            return "yes"
    return "no"


RULES = {"loose": rule, "babyai": babyai_rule}


class StubLLM:
    def __init__(self, mode: str = "rule", hold: float = 0.0, fail_first: int | None = None, port: int = 0,
                 judge=rule):
        self.mode, self.hold, self.fail_first, self.judge = mode, hold, fail_first, judge
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

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
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
        text = "I think the agent did it" if mode == "malformed" else self.judge(prompt)
        payload = b"<html>not json</html>" if mode == "not_json" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        return 200, payload

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the stub judge on 127.0.0.1 until interrupted.")
    parser.add_argument("--rule", choices=sorted(RULES), default="babyai")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = StubLLM(port=args.port, judge=RULES[args.rule])
    print(f"stub judge ({args.rule} rule) at {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
