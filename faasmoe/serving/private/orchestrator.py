"""A private-mode orchestrator: one tenant's control plane in its own process.

Started by the server (`PrivateBackend`) with its own engine, whose expert calls go
through the server's gateway to the shared function pool. It listens on a Unix
socket; per request, one connection carrying `serving.messages` as JSON lines:

  server -> orchestrator  Submit, later maybe Cancel
  orchestrator -> server  Accepted | Rejected, then TextEvent... and one DoneEvent

A cancel (or the server closing its end) cancels the request; its events, the final one
with every token it made, still follow while the server listens.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import threading
import uuid

from faasmoe.engines.distributed import Engine
from faasmoe.platforms import PlatformConfig
from faasmoe.serving.messages import Accepted, Cancel, DoneEvent, Rejected, Submit, ToOrchestrator
from faasmoe.serving.private.gateway import GatewayPlatform
from faasmoe.serving.scheduler import QueueFull, Request, StepScheduler

CANCEL_WAIT_S = 30.0  # how long a cancelled request's connection waits for its final event


def serve(args: argparse.Namespace) -> None:
    gateway = GatewayPlatform(PlatformConfig.model_validate_json(args.platform_config), address=args.gateway)
    scheduler = StepScheduler(lambda: Engine(
        args.model, experts_per_function=args.experts_per_function, platform=gateway, dtype=args.dtype,
        prefetch_layers=args.prefetch_layers, threads=args.threads), args.max_batch, args.max_queue)
    scheduler.start()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            lock = threading.Lock()
            finished = threading.Event()

            def emit(message) -> None:
                with lock:
                    conn.sendall(message.line())
                if isinstance(message, DoneEvent):
                    finished.set()

            line = self.rfile.readline()
            if not line:
                return
            msg = ToOrchestrator.validate_json(line)
            if not isinstance(msg, Submit):
                return
            req = Request(msg.id or uuid.uuid4().hex, msg.tenant or args.tenant, msg.prompt_ids, msg.params, emit)
            try:
                scheduler.submit(req)
            except ValueError as e:
                emit(Rejected(status=400, message=str(e), code=getattr(e, "code", None),
                              param=getattr(e, "param", None)))
                return
            except QueueFull as e:
                emit(Rejected(status=429, message=str(e)))
                return
            emit(Accepted())
            while not finished.is_set():  # a cancel message, or the server closing its end, means: cancel
                line = self.rfile.readline()
                if finished.is_set():
                    break
                if not line or isinstance(ToOrchestrator.validate_json(line), Cancel):
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
        scheduler.stop()  # and closes the engine
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
    # no defaults: the server passes every setting from its ServerConfig, where each default lives
    p.add_argument("--experts-per-function", type=int, required=True)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--max-queue", type=int, required=True)
    p.add_argument("--prefetch-layers", type=int, required=True)
    p.add_argument("--platform-config", required=True)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
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
