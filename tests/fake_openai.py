"""A small OpenAI-compatible HTTP server for tests, so the real `openai` client can be exercised offline.

`FakeOpenAIServer` listens on 127.0.0.1 (a free port) in a background thread and answers
`POST /v1/chat/completions`. Each request is recorded (method, path, headers, body) in `server.requests`, so a test
can check what the client really sent. What the server answers is scripted in two layers:

1. `server.enqueue(reply, ...)`: replies handed out first-in first-out, one per request (any route);
2. otherwise the route's behaviour function, `behaviour(request) -> Reply` (default: a valid perfect verdict), which
   may look at the request (for example at its text, via `request.texts()`) to decide.

Behaviour functions are called one at a time under a lock, so they may keep simple counters; the reply's `delay`
(plus the server-wide `latency`) is waited out after the lock is released, so slow replies overlap like real ones.
`server.max_in_flight` is the largest number of requests the server was handling at once.

Helpers build the usual replies: `chat_completion(text)`, `verdict(4, 3, 3)`, `rate_limited(retry_after)`,
`server_error()`, `error(status, message)` and `slow(reply, seconds)`. Add a route (say `/v1/images/edits`) with
`server.route("POST", "/v1/images/edits", behaviour)`.

Faults. `FAULTS` names every misbehaviour of a real server, proxy or network that the callers must survive, each as
`fault(answer, request) -> Reply`, where `answer` is the text a healthy reply would carry (a verdict, a label, a
critique) and `request` is the request being answered (the key echo reads its Authorization header). Transport
faults: a 503 page, a 429 without Retry-After, a connection reset, half a body, a reply slower than any test's
timeout. Malformed 200 replies: an HTML page (from a proxy or a captive portal), HTML labelled as JSON, an empty body,
a JSON array, an error object, no choices, `"message": null`, no text, a refusal. Answers in an unusual shape, which a
person would read as the answer: `content` as a list of parts, prose before a fenced JSON block. And a server that
echoes the Authorization header into an otherwise valid answer. `ANSWERING_FAULTS` are the ones that carry the
answer; `FATAL_KEY_ECHO` is the 401 whose message echoes the key.

    with FakeOpenAIServer(latency=0.1) as server:
        server.enqueue(rate_limited(0.05), server_error())
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    """What the server sends for one request. A dict or list body is sent as JSON, str or bytes as they are."""

    status: int = 200
    body: object = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (longer than the client's timeout = a hung server)
    content_type: str = "application/json"
    cut: bool = False  # announce the whole body's length, send half of it, close the connection
    reset: bool = False  # close the connection without answering at all


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it. Header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    def _content_parts(self) -> list[dict]:
        parts = []
        for message in self.json().get("messages", []):
            content = message.get("content")
            parts.extend([{"type": "text", "text": content}] if isinstance(content, str) else content or [])
        return parts

    def texts(self) -> list[str]:
        """The text parts of a chat request's messages, in order."""
        return [part["text"] for part in self._content_parts() if part.get("type") == "text"]

    def image_urls(self) -> list[str]:
        """The image URLs (often data URLs) of a chat request's messages, in order."""
        return [part["image_url"]["url"] for part in self._content_parts() if part.get("type") == "image_url"]


Behaviour = Callable[[RecordedRequest], Reply]


def chat_completion(
    content: str | None, *, model: str = "fake-judge", finish_reason: str = "stop", refusal: str | None = None
) -> Reply:
    """A 200 chat completion whose single choice says `content`."""
    message = {"role": "assistant", "content": content, "refusal": refusal}
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return Reply(200, body)


def verdict(
    fulfilment: object = 4, quality: object = 3, preservation: object = 3, reason: str = "fake verdict"
) -> Reply:
    """A chat completion whose content is a rubric verdict in JSON (scores may be anything, to test validation)."""
    payload = {"fulfilment": fulfilment, "quality": quality, "preservation": preservation, "reason": reason}
    return chat_completion(json.dumps(payload))


def error(status: int, message: str, *, headers: dict[str, str] | None = None) -> Reply:
    """An error reply with OpenAI's error body shape."""
    body = {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}
    return Reply(status, body, headers or {})


def rate_limited(retry_after: float = 0.05) -> Reply:
    """HTTP 429 with a Retry-After header (seconds; the openai client accepts fractions)."""
    return error(429, "Rate limit reached (fake)", headers={"Retry-After": f"{retry_after:g}"})


def server_error(status: int = 500) -> Reply:
    return error(status, "The server had an error (fake)")


def slow(reply: Reply, seconds: float) -> Reply:
    """The same reply, sent after `seconds`."""
    return replace(reply, delay=seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Faults

HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in to the network</title></head><body>Accept the terms</body></html>"
)
HUNG_SECONDS = 3.0  # longer than the timeout every fault test gives its client


def completion_body(message: object, *, choices: object = None) -> dict:
    """A chat-completion body with one choice whose message is `message` (any JSON, to build malformed ones)."""
    body = chat_completion("").body
    body["choices"] = [{"index": 0, "message": message, "finish_reason": "stop"}] if choices is None else choices
    return body


def _echo_key(answer: str, request: RecordedRequest) -> Reply:
    """The answer with the request's Authorization header written into its text (inside the JSON reason if any)."""
    echoed = f"(the server saw {request.headers.get('authorization', '')})"
    try:
        payload = json.loads(answer)
    except json.JSONDecodeError:
        return chat_completion(f"{answer} {echoed}")
    if isinstance(payload, dict) and "reason" in payload:
        payload["reason"] = f"{payload['reason']} {echoed}"
    elif isinstance(payload, dict):
        payload = {**payload, **{name: [*items, echoed] for name, items in payload.items() if isinstance(items, list)}}
    return chat_completion(json.dumps(payload))


Fault = Callable[[str, RecordedRequest], Reply]
FAULTS: dict[str, Fault] = {
    "503 page": lambda answer, request: server_error(503),
    "429 without Retry-After": lambda answer, request: error(429, "Rate limit reached (fake)"),
    "connection reset": lambda answer, request: Reply(reset=True),
    "half a body": lambda answer, request: replace(chat_completion(answer), cut=True),
    "hung reply": lambda answer, request: slow(chat_completion(answer), HUNG_SECONDS),
    "HTML page": lambda answer, request: Reply(200, HTML_PAGE, content_type="text/html"),
    "HTML labelled JSON": lambda answer, request: Reply(200, HTML_PAGE),
    "empty body": lambda answer, request: Reply(200, b""),
    "JSON array": lambda answer, request: Reply(200, [answer]),
    "error object with 200": lambda answer, request: Reply(200, {"error": {"message": "upstream overloaded"}}),
    "no choices": lambda answer, request: Reply(200, completion_body(None, choices=[])),
    "choices not a list": lambda answer, request: Reply(200, completion_body(None, choices="oops")),
    "null message": lambda answer, request: Reply(200, completion_body(None)),
    "null content": lambda answer, request: chat_completion(None, finish_reason="length"),
    "refusal": lambda answer, request: chat_completion(None, refusal="I can't help with that."),
    "content as a list of parts": lambda answer, request: Reply(
        200, completion_body({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    ),
    "prose before fenced JSON": lambda answer, request: chat_completion(
        f"Here is my answer.\n\n```json\n{answer}\n```\n\nLet me know if you need more."
    ),
    "key echoed in the answer": _echo_key,
}
ANSWERING_FAULTS = {"content as a list of parts", "prose before fenced JSON", "key echoed in the answer"}
FATAL_KEY_ECHO: Fault = lambda answer, request: error(  # noqa: E731
    401, f"Incorrect API key provided: {request.headers.get('authorization', '').removeprefix('Bearer ')}."
)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length),
        )
        fake = self.server.fake
        try:
            reply = fake._begin(request)
            if fake._stopping.wait(reply.delay + fake.latency):
                return  # the server is shutting down: drop the request unanswered
            if reply.reset:  # SO_LINGER 0: closing the socket sends a TCP RST instead of a clean FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            body = reply.body
            if isinstance(body, dict | list):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            body = body or b""
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if reply.cut else body)
            if reply.cut:
                self.close_connection = True
        finally:
            fake._end()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


class _HTTPServer(ThreadingHTTPServer):
    fake: FakeOpenAIServer

    def handle_error(self, request, client_address) -> None:
        # A client that timed out closes its socket before we answer; that is expected here, not an error.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 for tests; use as a context manager (or call start/stop)."""

    def __init__(self, behaviour: Behaviour | None = None, *, latency: float = 0.0) -> None:
        self.latency = latency  # seconds added to every reply
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._queue: deque[Reply] = deque()
        self._routes: dict[tuple[str, str], Behaviour] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.route("POST", "/v1/chat/completions", behaviour or (lambda request: verdict()))

    def route(self, method: str, path: str, behaviour: Behaviour) -> None:
        """Answer `method path` with `behaviour` (replacing any earlier behaviour for that route)."""
        self._routes[(method.upper(), path)] = behaviour

    def enqueue(self, *replies: Reply) -> None:
        """Replies to send, in order, before the route behaviours take over again."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes handlers that are waiting out a delay
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _begin(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            behaviour = self._routes.get((request.method, request.path.split("?")[0]))
            if behaviour is None:
                return error(404, f"no route for {request.method} {request.path} on the fake server")
            if self._queue:
                return self._queue.popleft()
            return behaviour(request)

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1
