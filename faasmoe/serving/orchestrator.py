"""A private-mode orchestrator: one tenant's control plane in its own process.

Started by the server (`PrivateBackend`) with its own engine, whose expert calls go
through the server's gateway to the shared function pool. It listens on a Unix
socket; per request, one connection carrying JSON lines:

  server -> orchestrator  {"id", "tenant", "prompt_ids", "params": {...}}, later maybe {"type": "cancel"}
  orchestrator -> server  {"type": "accepted"} | {"type": "rejected", "status": 400|429, "message"}
                          then {"type": "text", "text", "tokens"}... and {"type": "done", "finish_reason",
                          "usage"[, "error"]}

A cancel (or the server closing its end) cancels the request; its events, the final one
with every token it made, still follow while the server listens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import threading
import uuid

from faasmoe.control.sequence import SamplingParams
from faasmoe.engine import Engine
from faasmoe.platforms import PlatformConfig
from faasmoe.serving.scheduler import QueueFull, Request, StepScheduler, build_engine

CANCEL_WAIT_S = 30.0  # how long a cancelled request's connection waits for its final event


def serve(args: argparse.Namespace) -> None:
    engine = build_engine(lambda: Engine(
        args.model, experts_per_function=args.experts_per_function, platform="gateway",
        platform_options={"address": args.gateway}, dtype=args.dtype,
        platform_config=PlatformConfig.model_validate_json(args.platform_config), prefetch_layers=args.prefetch_layers))
    scheduler = StepScheduler(engine, args.max_batch, args.max_queue)
    scheduler.start()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            lock = threading.Lock()
            finished = threading.Event()

            def emit(event: dict) -> None:
                with lock:
                    conn.sendall((json.dumps(event) + "\n").encode())
                if event["type"] == "done":
                    finished.set()

            line = self.rfile.readline()
            if not line:
                return
            msg = json.loads(line)
            params = SamplingParams(**{**msg["params"], "stop": tuple(msg["params"].get("stop") or ())})
            req = Request(msg.get("id") or uuid.uuid4().hex, msg.get("tenant", args.tenant), msg["prompt_ids"],
                          params, emit)
            try:
                scheduler.submit(req)
            except ValueError as e:
                emit({"type": "rejected", "status": 400, "message": str(e)})
                return
            except QueueFull as e:
                emit({"type": "rejected", "status": 429, "message": str(e)})
                return
            emit({"type": "accepted"})
            while not finished.is_set():  # a cancel message, or the server closing its end, means: cancel
                line = self.rfile.readline()
                if finished.is_set():
                    break
                if not line or json.loads(line).get("type") == "cancel":
                    scheduler.cancel(req)
                    finished.wait(CANCEL_WAIT_S)
                    return

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    tmp = args.socket + ".tmp"
    server = Server(tmp, Handler)
    os.rename(tmp, args.socket)  # the socket appears only once the engine is loaded: that is "ready"

    def shutdown(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        server.serve_forever()
    finally:
        scheduler.stop()
        engine.close()
        server.server_close()
        try:
            os.unlink(args.socket)
        except OSError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--experts-per-function", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--prefetch-layers", type=int, default=0)
    p.add_argument("--platform-config", default="{}")
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    import time

    from faasmoe.proctitle import set_title

    set_title("orchestrator", args.tenant)
    parent = os.getppid()

    def watch_parent() -> None:  # a server that died without stopping us (SIGKILL): stop like on SIGTERM
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)  # still here (SIGTERM came before serve() installed its handler, or shutdown hung)

    threading.Thread(target=watch_parent, name="faasmoe-parent-watch", daemon=True).start()
    serve(args)


if __name__ == "__main__":
    main()
