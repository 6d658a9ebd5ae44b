"""The zygote: a process that has imported torch and the handler once, and forks instances on request.

A cold start then costs a fork plus the weight load, not a new interpreter and a
torch import (about 1 s here). Protocol on stdin/stdout, one JSON line each way:
`{"spec": {...}, "socket": path, "threads": n}` -> `{"pid": n}`. The zygote reaps
its children and exits when the platform closes its stdin; the children die with it.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from faasmoe.platforms import worker  # noqa: F401 - the import is the point: torch and the handler, once


def run() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    worker.die_with_parent(signal.SIGTERM)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)  # the platform's pipes belong to the zygote alone
            os.dup2(devnull, 1)
            worker.main(req["spec"], req["socket"], int(req.get("threads", 1)))
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


if __name__ == "__main__":
    run()
