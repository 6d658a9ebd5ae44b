"""The step scheduler's engine is built where it will not slow the steps down."""

from __future__ import annotations

import pytest


def test_the_engine_is_built_on_a_thread_that_is_gone_after():
    """So that the thread stepping the engine owns the process's only OpenMP pool (see build_engine)."""
    import threading

    from faasmoe.serving.scheduler import build_engine

    seen = []
    engine = object()
    assert build_engine(lambda: seen.append(threading.current_thread()) or engine) is engine
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def broken():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        build_engine(broken)
