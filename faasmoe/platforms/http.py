"""The `http` platform: call expert functions that another FaaS platform hosts, at URLs from a manifest.

`faasmoe package` writes the manifest (function id -> URL, and whether bodies are
binary or base64 text). Each call is an HTTP POST of the wire frame; calls of a layer
go out concurrently from a thread pool over pooled connections. Scaling is the host
platform's business; what it reveals in the packaged handler's response headers
(instance id, first call) is recorded as cold starts and warm hits.

Packaged functions require their token in `X-Faasmoe-Token`: the `token` given, else the
one in the manifest's `token_file` (written next to it by `faasmoe package`), if readable.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

from faasmoe.functions.spec import FunctionSpec
from faasmoe.platforms.base import InvocationError, Platform, PlatformConfig


def load_manifest(path: str | Path) -> dict:
    try:
        m = json.loads(Path(path).read_text())
        assert isinstance(m["functions"], dict)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise ValueError(f"{path}: not a faasmoe function manifest ({e})") from e
    return m


def _packaged_token(manifest_path: Path, manifest: dict) -> str | None:
    """The token `faasmoe package` wrote beside the manifest, or None if there is none to read."""
    name = manifest.get("token_file")
    if not isinstance(name, str) or not name or Path(name).name != name:  # a file beside the manifest, nothing else
        return None
    try:
        return (manifest_path.parent / name).read_text().strip() or None
    except OSError:
        return None


class HttpPlatform(Platform):
    name = "http"

    def __init__(self, config: PlatformConfig, manifest: str | Path, token: str | None = None,
                 max_concurrency: int = 64):
        super().__init__(config)
        self.manifest = load_manifest(manifest)
        self.base64 = self.manifest.get("encoding", "binary") == "base64"
        self.token = token or _packaged_token(Path(manifest), self.manifest)
        self._client = httpx.Client(timeout=httpx.Timeout(config.invoke_timeout_s, connect=10.0),
                                    limits=httpx.Limits(max_connections=max_concurrency,
                                                        max_keepalive_connections=max_concurrency))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="faasmoe-http")
        self._seen: dict[str, set[str]] = {}  # function -> instance ids seen
        self._lock = threading.Lock()

    def url(self, function_id: str) -> str:
        entry = self.manifest["functions"].get(function_id)
        if entry is None:
            raise InvocationError(f"function {function_id} is not in the manifest (packaged for another model "
                                  f"or another experts-per-function?)")
        return entry["url"]

    def deploy(self, spec: FunctionSpec) -> None:
        self.url(spec.id)
        self.log.deployed(spec.id, spec.nbytes)

    def submit(self, calls: Sequence[tuple[str, bytes]]) -> list[Future]:
        return [self._pool.submit(self._call, fid, frame) for fid, frame in calls]

    def gather(self, batch: list[Future]) -> list[bytes]:
        return [f.result() for f in batch]

    def _call(self, function_id: str, frame: bytes) -> bytes:
        url = self.url(function_id)
        self.log.invoked(function_id)
        headers = {"Content-Type": "text/plain" if self.base64 else "application/octet-stream"}
        if self.token:
            headers["X-Faasmoe-Token"] = self.token
        body = base64.b64encode(frame) if self.base64 else frame
        errors = []
        for attempt in range(self.config.max_retries + 1):
            t0 = time.perf_counter()
            try:
                r = self._client.post(url, content=body, headers=headers)
            except httpx.TimeoutException:
                errors.append("timed out")
                self.log.event("timeout", function_id, "?", time.perf_counter() - t0)
                continue
            except httpx.TransportError as e:
                errors.append(f"{type(e).__name__}: {e}")
                self.log.event("crash", function_id, "?", time.perf_counter() - t0)
                continue
            if r.status_code >= 500:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}" if r.text else f"HTTP {r.status_code}")
                continue
            if r.status_code != 200:
                raise InvocationError(f"function {function_id} at {url} answered HTTP {r.status_code}: "
                                      f"{r.text[:200]}")
            dt = time.perf_counter() - t0
            instance = r.headers.get("X-Faasmoe-Instance", "?")
            cold = r.headers.get("X-Faasmoe-Cold") == "1"
            load_s = float(r.headers.get("X-Faasmoe-Load-S", "nan"))
            if attempt:
                self.log.retried(function_id, attempt)
            self.log.called(function_id, dt)
            with self._lock:
                seen = self._seen.setdefault(function_id, set())
                seen.add(instance)
                self.log.instances_now(function_id, len(seen))
            self.log.event("cold_start" if cold else "warm_hit", function_id, instance, dt, load_s if cold else None)
            return base64.b64decode(r.content) if self.base64 else r.content
        raise InvocationError(f"function {function_id} at {url} failed after {len(errors)} attempts: "
                              + "; ".join(errors))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
