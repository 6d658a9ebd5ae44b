"""An expert function as a plain HTTP server: what `faasmoe package` ships to external FaaS platforms.

POST / with a wire frame as the body (or its base64 text, `Content-Type: text/plain`,
for platforms that carry strings, such as tinyFaaS) answers the reply frame the same
way. Response headers tell the caller about the instance: `X-Faasmoe-Instance` (a
random id per process), `X-Faasmoe-Cold: 1` on its first call, `X-Faasmoe-Load-S`
(its weight load time). GET /health answers 200 once the weights are loaded.

A POST must carry the function token in `X-Faasmoe-Token` (401 otherwise, compared in
constant time): the server does not start without one, taken from `$FAASMOE_TOKEN` or
the file `--token-file` / `$FAASMOE_TOKEN_FILE` (`faasmoe package` writes it). A body
over what the function can legally get (`spec.max_frame_bytes`: `--max-tokens-per-call`
rows, default $FAASMOE_MAX_TOKENS_PER_CALL or 8192) gets 413 unread, and a connection
that stalls longer than `--timeout` (default 30 s) is closed. It listens on loopback
unless `--host` or `$FAASMOE_FUNCTION_HOST` says otherwise (deploy files that need
0.0.0.0 set it, next to the token).

Standard library only (plus torch), so a function image stays small.

    FAASMOE_TOKEN_FILE=../../function-token python -m faasmoe.functions.http_server --spec spec.json --port 8080
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions.spec import FunctionSpec, max_frame_bytes, max_tokens_per_call

TOKEN_HEADER = "X-Faasmoe-Token"
DEFAULT_TIMEOUT_S = 30.0  # a connection silent this long mid-request (or idle) is closed


class TokenError(RuntimeError):
    """No function token configured: a function never serves unauthenticated."""


def load_spec(path: str | Path) -> FunctionSpec:
    """A spec file; relative tensor paths are resolved against the spec's own directory."""
    path = Path(path)
    d = json.loads(path.read_text())
    for t in d["tensors"]:
        if not os.path.isabs(t["file"]):
            t["file"] = str((path.parent / t["file"]).resolve())
    return FunctionSpec.from_json(d)


def load_token(path: str | Path | None = None) -> str:
    """The function token: $FAASMOE_TOKEN, else the contents of `path`, else of the file $FAASMOE_TOKEN_FILE."""
    token = os.environ.get("FAASMOE_TOKEN", "").strip()
    path = path or os.environ.get("FAASMOE_TOKEN_FILE")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise TokenError(f"cannot read the function token from {path}: {e}") from e
    if not token:
        raise TokenError("no function token: set FAASMOE_TOKEN or FAASMOE_TOKEN_FILE (faasmoe package writes one)")
    return token


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name, from any mapping a FaaS runtime hands a handler."""
    name = name.lower()
    return next((v for k, v in headers.items() if k.lower() == name), None)


def token_ok(presented: str | bytes | None, token: str) -> bool:
    """Constant-time comparison that any header value survives (non-ASCII text included): bytes, not str."""
    if presented is None:
        return False
    if isinstance(presented, str):
        presented = presented.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(presented, token.encode())


class FunctionServer:
    def __init__(self, spec: FunctionSpec, token: str, threads: int = 1, max_tokens: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if not token:
            raise TokenError("a function server needs a token")
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.fn = ExpertFunction(spec)
        self.load_s = time.perf_counter() - t0
        self.instance = secrets.token_hex(6)
        self.token = token
        self.max_frame = max_frame_bytes(spec, max_tokens)
        self.timeout_s = timeout_s
        self.calls = 0
        self._lock = threading.Lock()  # one call at a time per instance, as on every faasmoe platform

    def authorized(self, presented: str | bytes | None) -> bool:
        return token_ok(presented, self.token)

    def max_body(self, base64_text: bool) -> int:
        """The largest body worth reading: one legal frame, or its base64 text."""
        return 4 * -(-self.max_frame // 3) if base64_text else self.max_frame

    def call(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            cold = self.calls == 0
            self.calls += 1
            reply = self.fn.handle(body)
        return reply, {"X-Faasmoe-Instance": self.instance, "X-Faasmoe-Cold": "1" if cold else "0",
                       "X-Faasmoe-Load-S": f"{self.load_s:.6f}"}


def make_handler(server: FunctionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = server.timeout_s  # socket timeout on every connection: a slow reader cannot hold a thread

        def log_message(self, *args) -> None:  # quiet: one line per call is too much at this rate
            pass

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
                  close: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if close:  # the request body stays unread: this connection cannot carry another request
                self.send_header("Connection", "close")
                self.close_connection = True
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, json.dumps({"status": "ok", "function": server.fn.spec.id}).encode(),
                           "application/json")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            if not server.authorized(self.headers.get(TOKEN_HEADER)):
                self._send(401, f"missing or wrong {TOKEN_HEADER}".encode(), "text/plain", close=True)
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, b"Content-Length required", "text/plain", close=True)
                return
            text = self.headers.get("Content-Type", "").startswith("text/plain")
            if not 0 <= length <= server.max_body(text):
                self._send(413, f"a frame for this function is at most {server.max_body(text)} bytes".encode(),
                           "text/plain", close=True)
                return
            body = self.rfile.read(length)
            if text:
                try:
                    body = base64.b64decode(body, validate=True)
                except (binascii.Error, ValueError):
                    body = b""  # decodes to an error frame below
            reply, headers = server.call(body)
            if text:
                self._send(200, base64.b64encode(reply), "text/plain", headers)
            else:
                self._send(200, reply, "application/octet-stream", headers)

    return Handler


def serve(spec_path: str, token: str, host: str = "127.0.0.1", port: int = 8080, threads: int = 1,
          max_tokens: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    server = FunctionServer(load_spec(spec_path), token, threads, max_tokens, timeout_s)
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    print(f"function {server.fn.spec.id} listening on http://{host}:{httpd.server_port}", flush=True)
    httpd.serve_forever()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with defaults from faasmoe's own variables (a generic $HOST must not open the function up)."""
    p = argparse.ArgumentParser(description="Serve one faasmoe expert function over HTTP.")
    p.add_argument("--spec", default=os.environ.get("FAASMOE_SPEC", "spec.json"))
    p.add_argument("--host", default=os.environ.get("FAASMOE_FUNCTION_HOST") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--token-file", default=None, help="file holding the function token (unless $FAASMOE_TOKEN "
                                                      "is set; default $FAASMOE_TOKEN_FILE)")
    p.add_argument("--max-tokens-per-call", type=int, default=None,
                   help="token rows one call may carry (default $FAASMOE_MAX_TOKENS_PER_CALL or 8192)")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("FAASMOE_FUNCTION_TIMEOUT_S",
                                                                          DEFAULT_TIMEOUT_S)),
                   help="seconds a connection may stall before it is closed")
    a = p.parse_args(argv)
    if a.max_tokens_per_call is None:
        a.max_tokens_per_call = max_tokens_per_call()
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    try:
        token = load_token(a.token_file)
    except TokenError as e:
        raise SystemExit(f"faasmoe function: {e}") from None
    serve(a.spec, token, a.host, a.port, a.threads, a.max_tokens_per_call, a.timeout)


if __name__ == "__main__":
    main()
