"""An expert function as a plain HTTP server: what `faasmoe package` ships to external FaaS platforms.

POST / with a wire frame as the body (or its base64 text, `Content-Type: text/plain`,
for platforms that carry strings, such as tinyFaaS) answers the reply frame the same
way. Response headers tell the caller about the instance: `X-Faasmoe-Instance` (a
random id per process), `X-Faasmoe-Cold: 1` on its first call, `X-Faasmoe-Load-S`
(its weight load time). If `FAASMOE_TOKEN` is set, requests must carry it in
`X-Faasmoe-Token`. GET /health answers 200 once the weights are loaded.

Standard library only (plus torch), so a function image stays small.

    python -m faasmoe.functions.http_server --spec spec.json --port 8080
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from faasmoe.functions import wire
from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions.spec import FunctionSpec


def load_spec(path: str | Path) -> FunctionSpec:
    """A spec file; relative tensor paths are resolved against the spec's own directory."""
    path = Path(path)
    d = json.loads(path.read_text())
    for t in d["tensors"]:
        if not os.path.isabs(t["file"]):
            t["file"] = str((path.parent / t["file"]).resolve())
    return FunctionSpec.from_json(d)


class FunctionServer:
    def __init__(self, spec: FunctionSpec, token: str | None = None, threads: int = 1):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.fn = ExpertFunction(spec)
        self.load_s = time.perf_counter() - t0
        self.instance = secrets.token_hex(6)
        self.token = token
        self.calls = 0
        self._lock = threading.Lock()  # one call at a time per instance, as on every faasmoe platform

    def call(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            cold = self.calls == 0
            self.calls += 1
            reply = self.fn.handle(body)
        return reply, {"X-Faasmoe-Instance": self.instance, "X-Faasmoe-Cold": "1" if cold else "0",
                       "X-Faasmoe-Load-S": f"{self.load_s:.6f}"}


def make_handler(server: FunctionServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: one line per call is too much at this rate
            pass

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
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
            if server.token and not hmac.compare_digest(self.headers.get("X-Faasmoe-Token", ""), server.token):
                self._send(401, b"missing or wrong X-Faasmoe-Token", "text/plain")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, b"Content-Length required", "text/plain")
                return
            if not 0 <= length <= wire.MAX_FRAME_BYTES:
                self._send(413, b"frame too large", "text/plain")
                return
            body = self.rfile.read(length)
            text = self.headers.get("Content-Type", "").startswith("text/plain")
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


def serve(spec_path: str, host: str = "127.0.0.1", port: int = 8080, threads: int = 1) -> None:
    server = FunctionServer(load_spec(spec_path), os.environ.get("FAASMOE_TOKEN") or None, threads)
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    print(f"function {server.fn.spec.id} listening on http://{host}:{httpd.server_port}", flush=True)
    httpd.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description="Serve one faasmoe expert function over HTTP.")
    p.add_argument("--spec", default=os.environ.get("FAASMOE_SPEC", "spec.json"))
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    serve(a.spec, a.host, a.port, a.threads)


if __name__ == "__main__":
    main()
