"""`faasmoe package` output is closed by default: a token per package, kept where each target keeps secrets."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from faasmoe.models.checkpoint import Checkpoint
from faasmoe.packaging.build import TARGETS, package, secret_name

K = 4
SECRET_FILES = {"function-token", "knative-secret.yaml"}  # out/ files that hold the token, by design


@pytest.fixture(scope="module")
def packages(tiny, tmp_path_factory):
    """target -> (output directory, manifest dict, token)."""
    out = {}
    for target in TARGETS:
        d = tmp_path_factory.mktemp(target)
        manifest = json.loads(package(tiny, K, target, d).read_text())
        out[target] = (d, manifest, (d / "function-token").read_text().strip())
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _function_dirs(d: Path, manifest: dict) -> list[Path]:
    return [d / "functions" / f["name"] for f in manifest["functions"].values()]


@pytest.mark.parametrize("target", TARGETS)
def test_each_package_gets_its_own_private_token_file(packages, target):
    d, manifest, token = packages[target]
    assert len(token) >= 32 and _mode(d / "function-token") == 0o600
    assert manifest["token_file"] == "function-token"
    others = {t: tok for t, (_, _, tok) in packages.items() if t != target}
    assert token not in others.values()  # generated, not a constant
    ignored = (d / ".gitignore").read_text().splitlines()
    assert {"function-token", "knative-secret.yaml", "functions/*/function-token"} <= set(ignored)


@pytest.mark.parametrize("target", TARGETS)
def test_the_token_is_in_no_file_meant_to_be_committed(packages, target):
    d, _, token = packages[target]
    for path in d.rglob("*"):
        if path.is_file() and path.name not in SECRET_FILES and path.suffix != ".safetensors":
            assert token not in path.read_text(errors="replace"), path.relative_to(d)


def test_knative_service_is_cluster_local_non_root_and_reads_the_token_from_a_secret(tiny, packages):
    d, manifest, token = packages["knative"]
    name = secret_name(Checkpoint(tiny).digest)
    secret_file = d / "knative-secret.yaml"
    assert _mode(secret_file) == 0o600
    secret = yaml.safe_load(secret_file.read_text())
    assert (secret["kind"], secret["metadata"]["name"], secret["stringData"]["token"]) == ("Secret", name, token)
    for fd in _function_dirs(d, manifest):
        svc = yaml.safe_load((fd / "service.yaml").read_text())
        assert svc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
        container = svc["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["FAASMOE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "token"}
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["allowPrivilegeEscalation"] is False
        docker = (fd / "Dockerfile").read_text().splitlines()
        user = [line.split()[1] for line in docker if line.startswith("USER ")]
        assert user == [str(sc["runAsUser"])]  # numeric, so Kubernetes can verify runAsNonRoot
        assert "ENV FAASMOE_FUNCTION_HOST=0.0.0.0" in docker  # explicit, beside the token requirement
        assert not (fd / "function-token").exists()  # nothing secret goes into the image
    assert all(".svc.cluster.local" in f["url"] for f in manifest["functions"].values())


def test_openfaas_functions_use_an_openfaas_secret(tiny, packages):
    d, manifest, _ = packages["openfaas"]
    name = secret_name(Checkpoint(tiny).digest)
    stack = yaml.safe_load((d / "stack.yml").read_text())
    for fn in stack["functions"].values():
        assert fn["secrets"] == [name]
    assert f"faas-cli secret create {name} --from-file function-token" in (d / "stack.yml").read_text()
    for fd in _function_dirs(d, manifest):
        assert f"/var/openfaas/secrets/{name}" in (fd / "handler.py").read_text()


def test_tinyfaas_functions_carry_their_token_file(packages):
    d, manifest, token = packages["tinyfaas"]
    for fd in _function_dirs(d, manifest):
        assert (fd / "function-token").read_text().strip() == token and _mode(fd / "function-token") == 0o600


def test_repackaging_keeps_the_token_and_tightens_its_mode(tiny, tmp_path):
    package(tiny, K, "knative", tmp_path)
    token = (tmp_path / "function-token").read_text()
    (tmp_path / "function-token").chmod(0o644)
    package(tiny, K, "knative", tmp_path)
    assert (tmp_path / "function-token").read_text() == token and _mode(tmp_path / "function-token") == 0o600
