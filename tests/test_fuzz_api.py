"""Fuzz the HTTP API with schemathesis against the server's own OpenAPI schema: no 5xx, ever."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import running_server

KEY = "sk-fuzz-tenant-01"


def test_schemathesis_finds_no_server_errors(tiny, tmp_path):
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        st = shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed")
    with running_server(model=tiny, tenants=[{"name": "fuzz", "key": KEY, "max_concurrency": 64,
                                              "tokens_per_minute": 10**9}], max_tokens_limit=32) as base:
        r = subprocess.run(
            [str(st), "run", f"{base}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "40",
             "--header", f"Authorization: Bearer {KEY}", "--generation-deterministic", "--workers", "1",
             "--exclude-path", "/metrics", "--request-timeout", "60"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path, env=dict(os.environ, NO_COLOR="1"))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
