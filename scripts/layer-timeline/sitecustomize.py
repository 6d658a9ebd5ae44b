"""Stamps a host process's phases for `timeline.py` (loaded by every Python process started with this folder on
PYTHONPATH; it acts only where FAASMOE_TIMELINE_DIR is set, and only in the processes that import the embedded
platform's host module: the zygote and the hosts it forks).

Each stamp is a line "phase time" (time.perf_counter, CLOCK_MONOTONIC: one clock for every process) appended to
FAASMOE_TIMELINE_DIR/host-PID.log. A diagnostic: it wraps private functions, so it follows the code's names."""

import builtins
import os
import sys
import time

_DIR = os.environ.get("FAASMOE_TIMELINE_DIR")
if _DIR:
    _import = builtins.__import__
    _fd: list[int] = []

    def _stamp(phase: str) -> None:
        if not _fd:
            _fd.append(os.open(f"{_DIR}/host-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND))
        os.write(_fd[0], f"{phase} {time.perf_counter():.6f}\n".encode())

    def _around(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def stamped(*args, **kwargs):
            _stamp(phase)
            result = inner(*args, **kwargs)
            _stamp(phase + "_done")
            return result

        setattr(owner, name, stamped)

    def _patch() -> bool:
        host = sys.modules.get("faasmoe.platforms.local.host")
        if host is None or not hasattr(host, "serve_connections"):  # not imported, or still importing
            return False
        recv, send = host.recv_frame, host.send_frame

        def stamped_recv(*args, **kwargs):
            frame = recv(*args, **kwargs)
            _stamp("host_has_request")
            return frame

        def stamped_send(*args, **kwargs):
            _stamp("host_sends_reply")
            return send(*args, **kwargs)

        host.recv_frame, host.send_frame = stamped_recv, stamped_send
        expert = sys.modules["faasmoe.functions.expert"]
        _around(expert.wire, "decode_invocation_parts", "host_decode")
        _around(expert.ExpertFunction, "check", "host_check")
        _around(expert.ExpertFunction, "_compute", "host_compute")
        _around(expert.ExpertFunction, "_one_token", "host_compute")  # what a one-token call runs instead
        _around(expert, "_finite_bits", "host_finite")
        _around(expert.wire, "encode_result_raw", "host_encode")
        return True

    def _importing(name, *args, **kwargs):
        module = _import(name, *args, **kwargs)
        if _patch():
            builtins.__import__ = _import  # patched once: imports cost nothing more
        return module

    builtins.__import__ = _importing
