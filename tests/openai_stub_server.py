"""A minimal OpenAI-compatible chat server for the tests (stdlib only): `POST /v1/chat/completions` answers every
conversation from a deterministic policy, and it can fail on purpose. eval.py --api-base talks to it like to any
server (tests/test_api_eval.py).

    python tests/openai_stub_server.py --port 0 --key sk-test [--die-after K] [--fail-every N --fail-status 429]

The first stdout line is `port N`. Policy: GP-L (the prompt lists the cards) -> a correct formula found by brute force
under the prompt's face-card rule; GP-VL (cards only in the image) -> a fixed hand and formula; V-IRL -> forward().
Faults: a wrong or missing Bearer key -> 401; every N-th request -> HTTP --fail-status (429, 500, 503: transient);
request K+1 with --die-after K -> the process exits at once without answering (a killed server). Each request is
appended to --log as one JSON line (model, max_tokens, temperature, the message contents with image URLs shortened).
The server stops by itself after --lifetime-s seconds.
"""
import argparse
import ast
import itertools
import json
import os
import re
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FACE = {"A": 1, "J": 11, "Q": 12, "K": 13}
SHAPES = ("(({a}{o}{b}){p}{c}){q}{d}", "({a}{o}{b}){p}({c}{q}{d})", "({a}{o}({b}{p}{c})){q}{d}",
          "{a}{o}(({b}{p}{c}){q}{d})", "{a}{o}({b}{p}({c}{q}{d}))")


def solve24(values: list[int]) -> str:
    for a, b, c, d in itertools.permutations(values):
        for o, p, q in itertools.product("+-*/", repeat=3):
            for shape in SHAPES:
                expr = shape.format(a=a, b=b, c=c, d=d, o=o, p=p, q=q)
                exact = re.sub(r"\d+", lambda m: f"F({m.group()})", expr)  # our own ints only: exact fractions
                try:
                    if eval(exact, {"F": Fraction, "__builtins__": {}}) == 24:
                        return expr
                except ZeroDivisionError:
                    pass
    return "+".join(map(str, values))


def answer(messages: list) -> str:
    first = next(m for m in messages if m["role"] == "user")["content"]
    text = first if isinstance(first, str) else " ".join(p.get("text", "") for p in first)
    if "[Action space]" in text:  # V-IRL
        return '{\n  "current observation": "",\n  "current instruction": "",\n  "action": "forward()",\n}'
    found = re.search(r"Cards: (\[.*?\])", text)
    cards = ast.literal_eval(found.group(1)) if found else ["A", "2", "3", "4"]
    face_10 = "count as '10'" in text
    values = [10 if face_10 and c in "JQK" else FACE.get(c) or int(c) for c in cards]
    formula = solve24(values) if found else "(1+2+3)*4"
    return '\n{\n  "cards": %r,\n  "number": %r,\n  "formula": "%s=24",\n}' % (cards, values, formula)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="sk-test")
    parser.add_argument("--model", default="stub")
    parser.add_argument("--die-after", type=int, default=0, help="exit when request K+1 arrives (0 = never)")
    parser.add_argument("--fail-every", type=int, default=0, help="every N-th request fails (0 = never)")
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--log", default=None)
    parser.add_argument("--lifetime-s", type=float, default=300.0)
    args = parser.parse_args()
    lock, count = threading.Lock(), [0]

    class Handler(BaseHTTPRequestHandler):
        def reply(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str, code: str):
            self.reply(status, {"error": {"message": message, "type": code, "param": None, "code": code}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with lock:
                count[0] += 1
                n = count[0]
                if args.die_after and n > args.die_after:
                    os._exit(3)  # killed mid-run: the connection drops without an answer
                if args.log:
                    shown = [dict(m, content=m["content"] if isinstance(m["content"], str) else
                                  [dict(p, image_url={"url": p["image_url"]["url"][:23], "length":
                                                      len(p["image_url"]["url"])}) if p["type"] == "image_url" else p
                                   for p in m["content"]]) for m in body.get("messages", [])]
                    with open(args.log, "a") as f:
                        f.write(json.dumps(dict(n=n, path=self.path, auth=self.headers.get("Authorization") ==
                                                f"Bearer {args.key}", **{k: v for k, v in body.items()
                                                                         if k != "messages"}, messages=shown)) + "\n")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.error(404, f"no route {self.path}", "not_found")
            if self.headers.get("Authorization") != f"Bearer {args.key}":
                return self.error(401, "Incorrect API key provided.", "invalid_api_key")
            if body.get("model") != args.model:
                return self.error(404, f"The model {body.get('model')!r} does not exist", "model_not_found")
            if args.fail_every and n % args.fail_every == 0:
                return self.error(args.fail_status, f"simulated HTTP {args.fail_status}", "server_error")
            self.reply(200, {"id": f"chatcmpl-stub-{n}", "object": "chat.completion", "created": int(time.time()),
                             "model": args.model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": answer(body["messages"])}}],
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

        def log_message(self, *a):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    threading.Timer(args.lifetime_s, lambda: os._exit(0)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
