"""The packaged function's HTTP server under hostile clients: bad tokens, oversized bodies, stalled connections."""

from __future__ import annotations

import socket
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch

from faasmoe.control.deployment import Deployment
from faasmoe.functions import http_server, wire
from faasmoe.functions.http_server import FunctionServer, TokenError, make_handler
from faasmoe.functions.spec import MAX_TOKENS_PER_CALL, max_frame_bytes
from faasmoe.models.checkpoint import Checkpoint

TOKEN = "sk-fn-test-token"
CLIENT_TIMEOUT_S = 60  # a failure detector only: every answer below comes at once from a fixed server


@pytest.fixture(scope="module")
def spec(tiny):
    return Deployment.plan(Checkpoint(tiny), 4, "float32").specs[0]


@pytest.fixture
def server(spec, request):
    """(host, port, FunctionServer) of an in-process function server; `request.param` = its settings."""
    fs = FunctionServer(spec, TOKEN, **getattr(request, "param", {}))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fs))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield "127.0.0.1", httpd.server_port, fs
    httpd.shutdown()
    httpd.server_close()


def raw_request(addr: tuple[str, int], head: bytes, body: bytes = b"") -> bytes:
    """Send raw bytes, return everything the server answers before it closes (or the first response)."""
    with socket.create_connection(addr, timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(head + body)
        return _read_response(s)


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length and (chunk := s.recv(65536)):
        rest += chunk
    return head + b"\r\n\r\n" + rest


def post_head(length: int, token: bytes | None = TOKEN.encode(), content_type: bytes = b"application/octet-stream",
              ) -> bytes:
    lines = [b"POST / HTTP/1.1", b"Host: fn", b"Content-Type: " + content_type, b"Content-Length: %d" % length]
    if token is not None:
        lines.append(b"X-Faasmoe-Token: " + token)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:100]
    return int(response.split(b" ", 2)[1])


def valid_frame(spec, T: int = 2) -> bytes:
    return wire.encode_invocation(wire.Invocation(
        bytes.fromhex(spec.model), spec.layer, spec.block, torch.ones(T, spec.hidden_size),
        torch.arange(T, dtype=torch.int32), torch.tensor([spec.experts[0]] * T, dtype=torch.int32),
        torch.full((T,), 0.5)))


def test_valid_call_with_the_token_answers_a_result(spec, server):
    host, port, _ = server
    frame = valid_frame(spec)
    r = raw_request((host, port), post_head(len(frame)), frame)
    assert status(r) == 200
    assert wire.decode_header(r.partition(b"\r\n\r\n")[2]).kind == wire.RESULT


@pytest.mark.parametrize("token", [None, b"wrong", b"sk-fn-test-tokeN", b"\xff\xfe\xfd non-ascii", "sk-fn-t\u00e9st".encode()])
def test_a_missing_wrong_or_non_ascii_token_gets_401(spec, server, token):
    host, port, _ = server
    frame = valid_frame(spec)
    r = raw_request((host, port), post_head(len(frame), token=token), frame)
    assert status(r) == 401
    assert b"connection: close" in r.lower()  # the body stays unread: the connection is not reused


def test_body_over_the_frame_limit_gets_413_without_being_read(spec, server):
    host, port, fs = server
    limit = max_frame_bytes(spec, MAX_TOKENS_PER_CALL)
    assert fs.max_frame == limit < wire.MAX_FRAME_BYTES
    # headers only: a server that tried to read the announced body would never answer
    assert status(raw_request((host, port), post_head(limit + 1))) == 413
    assert status(raw_request((host, port), post_head(4 * -(-limit // 3) + 1, content_type=b"text/plain"))) == 413
    assert status(raw_request((host, port), post_head(-1))) == 413


def test_body_at_the_limit_is_read_and_answered(spec, server):
    host, port, fs = server
    body = bytes(fs.max_frame)  # zeros: not a frame, so an error frame comes back, but it was read
    r = raw_request((host, port), post_head(len(body)), body)
    assert status(r) == 200 and wire.decode_header(r.partition(b"\r\n\r\n")[2]).kind == wire.ERROR


@pytest.mark.parametrize("server", [{"max_tokens": 2}], indirect=True)
def test_max_tokens_per_call_sets_the_limit(spec, server):
    host, port, fs = server
    assert fs.max_frame == max_frame_bytes(spec, 2) == 40 + 2 * (64 * 4 + 12 * 4)
    frame = valid_frame(spec, T=3)
    assert status(raw_request((host, port), post_head(len(frame)), frame)) == 413
    frame = valid_frame(spec, T=2)
    assert status(raw_request((host, port), post_head(len(frame)), frame)) == 200


def test_max_tokens_per_call_comes_from_the_environment(spec, monkeypatch):
    monkeypatch.setenv("FAASMOE_MAX_TOKENS_PER_CALL", "16")
    assert max_frame_bytes(spec) == max_frame_bytes(spec, 16)
    assert http_server.parse_args([]).max_tokens_per_call == 16
    monkeypatch.setenv("FAASMOE_MAX_TOKENS_PER_CALL", "0")
    with pytest.raises(ValueError):
        max_frame_bytes(spec)


@pytest.mark.parametrize("server", [{"timeout_s": 0.2}], indirect=True)
def test_a_stalled_connection_is_closed(server):
    host, port, _ = server
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: fn\r\n")  # and then nothing: headers never end
        assert s.recv(1024) == b""  # the server hung up (a server without a timeout would wait forever)
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(post_head(100))  # a body announced and never sent
        assert s.recv(1024) == b""


def test_default_timeout_is_set_on_connections(spec):
    fs = FunctionServer(spec, TOKEN)
    assert make_handler(fs).timeout == http_server.DEFAULT_TIMEOUT_S == 30.0
    assert http_server.parse_args([]).timeout == 30.0


def test_generic_host_variable_does_not_open_the_function(monkeypatch):
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.delenv("FAASMOE_FUNCTION_HOST", raising=False)
    assert http_server.parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("FAASMOE_FUNCTION_HOST", "0.0.0.0")
    assert http_server.parse_args([]).host == "0.0.0.0"


def test_the_server_does_not_start_without_a_token(spec, monkeypatch, tmp_path):
    monkeypatch.delenv("FAASMOE_TOKEN", raising=False)
    monkeypatch.delenv("FAASMOE_TOKEN_FILE", raising=False)
    with pytest.raises(TokenError):
        http_server.load_token()
    with pytest.raises(TokenError):
        FunctionServer(spec, "")
    with pytest.raises(SystemExit, match="no function token"):
        http_server.main(["--spec", "missing.json"])
    (tmp_path / "tok").write_text("from-file\n")
    assert http_server.load_token(tmp_path / "tok") == "from-file"
    monkeypatch.setenv("FAASMOE_TOKEN_FILE", str(tmp_path / "tok"))
    assert http_server.load_token() == "from-file"
    monkeypatch.setenv("FAASMOE_TOKEN", "from-env")
    assert http_server.load_token(tmp_path / "tok") == "from-env"
