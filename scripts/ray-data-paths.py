"""How long one request takes to reach a host on Ray and come back, by three paths (issue 15's data path).

A 4 KiB request (about one decode step's frame for a layer) is echoed by a Ray actor through (1) a TCP socket
the actor serves from a thread (what the `ray` platform uses), (2) a Ray actor method call, (3) a Ray Serve
deployment handle with model multiplexing (`multiplexed_model_id`, the routing Serve offers for many models
per replica). Each path is timed `--calls` times, twice, interleaved; medians and 90th percentiles.

    .venv/bin/python scripts/ray-data-paths.py [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from faasmoe.platforms.local.transport import recv_frame, send_frame  # noqa: E402

FRAME = os.urandom(4096)


@ray.remote(num_cpus=0)
class Echo:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (msg := recv_frame(conn)) is not None:
                send_frame(conn, bytes(msg))

    def call(self, frame: bytes) -> bytes:
        return frame


@serve.deployment(num_replicas=1, max_ongoing_requests=1, ray_actor_options={"num_cpus": 0})
class ServedEcho:
    @serve.multiplexed(max_num_models_per_replica=64)
    async def get_model(self, model_id: str) -> str:
        return model_id

    async def __call__(self, frame: bytes) -> bytes:
        await self.get_model(serve.get_multiplexed_model_id())
        return frame


def timed(fn, n: int) -> tuple[float, float]:
    for _ in range(20):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return statistics.median(ts) * 1e3, ts[int(0.9 * n)] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    n = ap.parse_args().calls
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=256 * 2**20,
             log_to_driver=False)
    try:
        echo = Echo.remote()
        sock = socket.create_connection(tuple(ray.get(echo.address.remote())))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        serve.start(proxy_location="Disabled")
        handle = serve.run(ServedEcho.bind(), name="paths", route_prefix=None)

        def direct() -> None:
            send_frame(sock, FRAME)
            recv_frame(sock)

        paths = {"direct TCP socket to the actor": direct,
                 "Ray actor method call": lambda: ray.get(echo.call.remote(FRAME)),
                 "Ray Serve handle, multiplexed": lambda: handle.options(multiplexed_model_id="f1")
                 .remote(FRAME).result()}
        for _ in range(2):
            for name, fn in paths.items():
                med, p90 = timed(fn, n)
                print(f"{name:34s} median {med:7.3f} ms   p90 {p90:7.3f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
