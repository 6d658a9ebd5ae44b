"""Functions packaged for external FaaS platforms, run as plain HTTP servers, called with --platform http."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from helpers import greedy_reference

import faasmoe
from faasmoe.control.deployment import Deployment, prewarm_calls
from faasmoe.functions import wire
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.packaging.build import package
from faasmoe.platforms import InvocationError, PlatformConfig
from faasmoe.platforms.http import HttpPlatform

K = 4


def _free_port_run(n: int) -> int:
    """The first of n consecutive free ports, below the kernel's ephemeral range (32768 and up here), where
    no outgoing connection of another test can take one of them between this check and the servers' bind."""
    rng = random.Random(os.getpid())
    for _ in range(200):
        first = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in 20000-32000")


def _token(manifest_path: Path) -> str:
    return (manifest_path.parent / "function-token").read_text().strip()


def _serve_packages(manifest_path: Path) -> list[subprocess.Popen]:
    """Run every packaged function as a plain HTTP server, on its own vendored code (not the installed faasmoe),
    with the token `faasmoe package` generated."""
    manifest = json.loads(manifest_path.read_text())
    procs = []
    for f in manifest["functions"].values():
        d = manifest_path.parent / "functions" / f["name"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAASMOE_")}
        env.update(PYTHONPATH=str(d), FAASMOE_TOKEN_FILE=str(manifest_path.parent / "function-token"))
        procs.append(subprocess.Popen([sys.executable, "-m", "faasmoe.functions.http_server", "--spec", "spec.json",
                                       "--port", str(f["port"])], cwd=d, env=env, stdout=subprocess.PIPE, text=True))
    try:
        for p in procs:
            line = p.stdout.readline()
            assert "listening" in line, line
    except BaseException:  # one failed to start: stop the others too, or they outlive the test run
        for p in procs:
            p.kill()
            p.wait()
        raise
    return procs


def _packaged(path: str, out: Path):
    first = _free_port_run(3 * (8 // K))  # one port per function: 3 MoE layers of the tiny models, 8 // K blocks
    manifest = package(path, K, "knative", out, base_url="http://127.0.0.1:{port}/", start_port=first)
    procs = _serve_packages(manifest)
    yield manifest
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def packaged(tiny, tmp_path_factory):
    yield from _packaged(tiny, tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def packaged_mixtral(checkpoint, tmp_path_factory):
    """Another family (whose expert tensors are named w1, w3, w2, with gate and up apart) over HTTP."""
    yield from _packaged(checkpoint("mixtral"), tmp_path_factory.mktemp("pkg-mixtral"))


def test_package_contents_for_every_target(tiny, tmp_path):
    n_functions = 3 * (8 // K)
    for target, files in {"knative": ("Dockerfile", "service.yaml"), "openfaas": ("handler.py",),
                          "tinyfaas": ("fn.py",)}.items():
        manifest = json.loads(package(tiny, K, target, tmp_path / target).read_text())
        assert len(manifest["functions"]) == n_functions and manifest["model"] == Checkpoint(tiny).digest
        assert manifest["encoding"] == ("base64" if target == "tinyfaas" else "binary")
        for f in manifest["functions"].values():
            d = tmp_path / target / "functions" / f["name"]
            for name in files + ("spec.json", "requirements.txt", "weights.safetensors",
                                 "faasmoe/functions/expert.py", "faasmoe/functions/wire.py"):
                assert (d / name).is_file(), (target, name)
            spec = json.loads((d / "spec.json").read_text())
            assert {t["file"] for t in spec["tensors"]} == {"weights.safetensors"}
            assert (d / "weights.safetensors").stat().st_size < 2 * sum(t["nbytes"] for t in spec["tensors"])
    assert "com.openfaas.scale.zero" in (tmp_path / "openfaas" / "stack.yml").read_text()
    svc = next((tmp_path / "knative" / "functions").iterdir()) / "service.yaml"
    assert 'min-scale: "0"' in svc.read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in (svc.parent / "requirements.txt").read_text()


def test_a_package_runs_on_its_vendored_code_alone(tiny, tmp_path):
    """The handler's code is copied into each package: it must import nothing of faasmoe that is not there."""
    manifest = json.loads(package(tiny, K, "openfaas", tmp_path).read_text())
    d = tmp_path / "functions" / next(iter(manifest["functions"].values()))["name"]
    probe = ("import sys, faasmoe, faasmoe.functions.http_server, faasmoe.functions.expert\n"
             "assert faasmoe.__file__.startswith(sys.argv[1]), faasmoe.__file__\n"
             "assert not [m for m in sys.modules if m.startswith('faasmoe.') and m.split('.')[1] in "
             "('engines', 'control', 'serving', 'platforms')], 'imports the control plane'\n"
             "import handler\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"FAASMOE_TOKEN_FILE": str(tmp_path / "function-token")}
    r = subprocess.run([sys.executable, "-c", probe, str(d)], cwd=d, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("variant", ["tiny", "mixtral"])
def test_exact_logits_and_tokens_over_http(checkpoint, reference, request, variant):
    path = checkpoint(variant)
    packaged = request.getfixturevalue("packaged" if variant == "tiny" else "packaged_mixtral")
    ids = [785, 6722, 315, 9625, 374, 12095, 13]
    with faasmoe.load(path, experts_per_function=K, platform="http",
                      platform_options={"manifest": packaged, "token": _token(packaged)}) as engine:
        logits = engine.logits(ids)
        with torch.no_grad():
            expected = reference(path)(torch.tensor([ids])).logits[0]
        assert (logits - expected).abs().max().item() < 1e-4
        result = engine.generate(ids, max_tokens=8)
        assert result.token_ids == greedy_reference(reference(path), ids, 8)
        stats = engine.platform.log.stats
        assert sum(s.cold_starts for s in stats.values()) == len(engine.specs)  # one process each, first call cold
        assert sum(s.warm_hits for s in stats.values()) > 0


def test_function_token_is_enforced(tiny, packaged):
    spec = Deployment.plan(Checkpoint(tiny), K, "float32").specs[0]
    platform = HttpPlatform(PlatformConfig(max_retries=0), packaged, token="wrong")
    try:
        with pytest.raises(InvocationError, match="401"):
            platform.invoke(spec.id, prewarm_calls([spec])[0][1])
    finally:
        platform.close()
    url = json.loads(packaged.read_text())["functions"][spec.id]["url"]
    assert httpx.post(url, content=b"x").status_code == 401
    assert httpx.post(url, content=b"x", headers={"X-Faasmoe-Token": b"\xff\xfe"}).status_code == 401


def test_packaged_server_refuses_to_start_without_a_token(packaged):
    d = packaged.parent / "functions" / next(iter(json.loads(packaged.read_text())["functions"].values()))["name"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAASMOE_")}
    r = subprocess.run([sys.executable, "-m", "faasmoe.functions.http_server", "--spec", "spec.json", "--port", "0"],
                       cwd=d, env=dict(env, PYTHONPATH=str(d)), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no function token" in r.stderr


def test_tinyfaas_and_openfaas_entry_points_answer_frames(tiny, tmp_path):
    spec = Deployment.plan(Checkpoint(tiny), K, "float32").specs[0]
    g = torch.Generator().manual_seed(0)
    inv = wire.Invocation(bytes.fromhex(spec.model), spec.layer, spec.block, torch.randn(2, 64, generator=g),
                          torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
                          torch.tensor([0.3, 0.7]))
    frame = wire.encode_invocation(inv)
    from faasmoe.functions.expert import ExpertFunction

    expected = ExpertFunction(spec).compute(inv)
    # each entry point is called without a token, with a wrong one (both refused), then with the packaged one
    calls = {
        "tinyfaas": "def call(h):\n"
                    "    try:\n        return fn.fn(sys.argv[1], h)\n"
                    "    except PermissionError:\n        return 'refused'\n",
        "openfaas": "import base64\n"
                    "class E:\n    body = base64.b64decode(sys.argv[1])\n"
                    "def call(h):\n    E.headers = h\n    r = handler.handle(E(), None)\n"
                    "    return base64.b64encode(r['body']).decode() if r['statusCode'] == 200 else r['statusCode']\n",
    }
    for target, call in calls.items():
        out_dir = tmp_path / target
        manifest = json.loads(package(tiny, K, target, out_dir).read_text())
        d = out_dir / "functions" / manifest["functions"][spec.id]["name"]
        module = "fn" if target == "tinyfaas" else "handler"
        token = (out_dir / "function-token").read_text().strip()
        script = (f"import sys\nimport {module}\n{call}print(call({{}}))\nprint(call({{'X-Faasmoe-Token': 'no'}}))\n"
                  f"print(call({{'x-faasmoe-token': {token!r}}}))")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAASMOE_")}
        if target == "openfaas":  # the secret's path on OpenFaaS is /var/openfaas/secrets/<name>
            env["FAASMOE_TOKEN_FILE"] = str(out_dir / "function-token")
        r = subprocess.run([sys.executable, "-c", script, base64.b64encode(frame).decode()], cwd=d,
                           env=dict(env, PYTHONPATH=str(d)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        refused, wrong, reply = r.stdout.split()
        assert refused == wrong == ("refused" if target == "tinyfaas" else "401"), target
        out = wire.decode_result(base64.b64decode(reply), torch.float32, 2, 64)
        assert torch.equal(out, expected), target


def test_base64_bodies_over_http(tiny, tmp_path):
    port = _free_port_run(3)
    manifest = package(tiny, 8, "tinyfaas", tmp_path, base_url="http://127.0.0.1:{port}/", start_port=port)
    m = json.loads(manifest.read_text())
    # serve only the first function; one call proves base64 in both directions
    procs = _serve_packages_subset(manifest, m, 1)
    try:
        spec = Deployment.plan(Checkpoint(tiny), 8, "float32").specs[0]
        platform = HttpPlatform(PlatformConfig(), manifest)  # no token given: the one beside the manifest
        reply = platform.invoke(spec.id, prewarm_calls([spec])[0][1])
        platform.close()
        assert torch.equal(wire.decode_result(reply, torch.float32, 1, 64), torch.zeros(1, 64))
    finally:
        for p in procs:
            p.kill()


def _serve_packages_subset(manifest_path: Path, manifest: dict, n: int) -> list[subprocess.Popen]:
    sub = dict(manifest, functions=dict(list(manifest["functions"].items())[:n]))
    path = manifest_path.parent / "subset.json"
    path.write_text(json.dumps(sub))
    return _serve_packages(path)
