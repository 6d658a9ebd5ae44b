"""`faasmoe package`: write each expert function in the form an external FaaS platform deploys.

For every (MoE layer, block of k experts) a directory with the handler in the target's
expected form, its requirements, the function's own weights (a small safetensors file
holding only its tensors, or a reference to the checkpoint), and the target's build
or deploy file. Beside them, `manifest.json` maps each function id to its URL, for
`--platform http --functions manifest.json`.

Targets: tinyfaas (`fn.py`, string payloads: frames travel base64-encoded), openfaas
(python3-http template `handler.py` + `stack.yml`, scale from zero), knative (a
container serving HTTP on $PORT + a Service manifest with min-scale 0). Every package
also runs as a plain HTTP server: `python -m faasmoe.functions.http_server --spec spec.json`.

Every function requires a token (`X-Faasmoe-Token`). One is generated per package
(`out/function-token`, mode 0600; reused when packaging into the same directory again),
for `faasmoe serve --platform http --function-token "$(cat out/function-token)"`, and put
where the target keeps secrets, never into the manifest or a deploy file meant to be
committed: knative, the Secret manifest `out/knative-secret.yaml` (0600) that each
Service reads through `secretKeyRef`; openfaas, the OpenFaaS secret named in stack.yml
(`faas-cli secret create <name> --from-file out/function-token`), read from
/var/openfaas/secrets/<name>; tinyfaas, which has neither secrets nor environment
variables, a `function-token` file (0600) inside each function's folder, uploaded with it.
`out/.gitignore` lists these files. The Knative Service is cluster-local and its container
runs as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Literal

from faasmoe.control.deployment import Deployment
from faasmoe.functions.spec import FunctionSpec
from faasmoe.models.align import save_aligned
from faasmoe.models.checkpoint import Checkpoint, read_safetensors_header
from faasmoe.models.weights import map_tensors, torch_dtype

Target = Literal["tinyfaas", "openfaas", "knative"]
# What each target deploys, written from the templates beside this module (string.Template: ${name}).
TARGET_FILES = {"tinyfaas": ("fn.py", "README.md"), "openfaas": ("handler.py",),
                "knative": ("Dockerfile", "service.yaml")}
TARGETS = tuple(TARGET_FILES)

# The handler's own code, vendored into every package (it imports nothing else of faasmoe: tested).
VENDORED = ["functions/__init__.py", "functions/wire.py", "functions/expert.py", "functions/spec.py",
            "functions/http_server.py", "models/__init__.py", "models/weights.py", "models/checkpoint.py",
            "models/layers.py", "models/kernels.py"]

DEFAULT_URLS = {
    "tinyfaas": "http://127.0.0.1:8000/{name}",
    "openfaas": "http://127.0.0.1:8080/function/{name}",
    "knative": "http://{name}.default.svc.cluster.local/",  # cluster-local: call it from inside the cluster
}

TOKEN_FILE = "function-token"
KNATIVE_SECRET_FILE = "knative-secret.yaml"
UNPRIVILEGED_UID = 10001

def requirements() -> str:
    """A function's requirements: the torch this faasmoe runs with (pinned in pyproject.toml, nowhere else)."""
    torch_version = version("torch").split("+")[0]
    return f"numpy\n--extra-index-url https://download.pytorch.org/whl/cpu\ntorch=={torch_version}\n"


def function_name(spec: FunctionSpec) -> str:
    """A DNS-safe name (Knative, OpenFaaS and tinyFaaS all accept it)."""
    return f"fm-{spec.model[:8]}-l{spec.layer}-b{spec.block}"


def package(model: str | Path, experts_per_function: int, target: Target, out: str | Path,
            base_url: str | None = None, start_port: int = 9000, copy_weights: bool = True,
            dtype: str | None = None, keep_alive_s: float = 30.0, max_instances: int = 4) -> Path:
    """Write every function's package under `out/functions/` and `out/manifest.json`; returns the manifest path."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    ckpt = Checkpoint(model)
    deployment = Deployment.plan(ckpt, experts_per_function, dtype)
    specs, dtype = deployment.specs, deployment.dtype
    out = Path(out)
    (out / "functions").mkdir(parents=True, exist_ok=True)
    template = base_url or DEFAULT_URLS[target]
    token = _package_token(out)
    secret = secret_name(ckpt.digest)
    functions = {}
    for i, spec in enumerate(specs):
        name = function_name(spec)
        d = out / "functions" / name
        d.mkdir(exist_ok=True)
        _vendor(d)
        spec_json = spec.to_json()
        if copy_weights:  # self-contained: the function ships only its own tensors
            tensors = map_tensors(spec.tensors, torch_dtype(dtype))
            save_aligned({k: v.contiguous() for k, v in tensors.items()}, d / "weights.safetensors")
            locs = read_safetensors_header(d / "weights.safetensors")
            spec_json["tensors"] = [{**locs[t.name].to_json(), "file": "weights.safetensors"} for t in spec.tensors]
        (d / "spec.json").write_text(json.dumps(spec_json, indent=1))
        (d / "requirements.txt").write_text(requirements())
        _write_target(target, d, name, keep_alive_s, max_instances, secret, token)
        functions[spec.id] = {"name": name, "layer": spec.layer, "block": spec.block, "experts": list(spec.experts),
                              "url": template.format(name=name, port=start_port + i, index=i),
                              "port": start_port + i}
    if target == "openfaas":
        _write_openfaas_stack(out, [f["name"] for f in functions.values()], keep_alive_s, max_instances, secret)
    if target == "knative":
        _write_secret(out / KNATIVE_SECRET_FILE, _knative_secret(secret, token))
    (out / ".gitignore").write_text(f"# secrets: never commit them\n{TOKEN_FILE}\n{KNATIVE_SECRET_FILE}\n"
                                    f"functions/*/{TOKEN_FILE}\n")
    manifest = {"model": ckpt.digest, "checkpoint": str(ckpt.path), "experts_per_function": experts_per_function,
                "dtype": dtype, "target": target, "encoding": "base64" if target == "tinyfaas" else "binary",
                "token_file": TOKEN_FILE, "functions": functions}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def secret_name(model_digest: str) -> str:
    """The platform secret holding a model's function token (one per model, so packages of two models coexist)."""
    return f"fm-{model_digest[:8]}-token"


def _write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read, whatever the umask, and never through a wider existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _package_token(out: Path) -> str:
    """The package's function token: the one already in `out` (functions deployed from it keep working), else new."""
    path = out / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    token = token or secrets.token_urlsafe(32)
    _write_secret(path, token + "\n")
    return token


def _knative_secret(name: str, token: str) -> str:
    return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ntype: Opaque\n"
            f"stringData:\n  token: {json.dumps(token)}\n")


def _vendor(d: Path) -> None:
    src = Path(__file__).resolve().parent.parent  # faasmoe/
    for rel in VENDORED:
        dst = d / "faasmoe" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
    (d / "faasmoe" / "__init__.py").write_text("")  # not faasmoe's own: it imports the engine


def _render(target: str, file: str, **values) -> str:
    template = files("faasmoe.packaging").joinpath("templates", target, file + ".tmpl").read_text()
    return Template(template).substitute(values)


def _write_target(target: str, d: Path, name: str, keep_alive_s: float, max_instances: int, secret: str,
                  token: str) -> None:
    if target == "tinyfaas":
        _write_secret(d / TOKEN_FILE, token + "\n")  # tinyFaaS has no secrets or env: the token travels in the zip
    values = {"name": name, "secret": secret, "TOKEN_FILE": TOKEN_FILE, "UNPRIVILEGED_UID": UNPRIVILEGED_UID,
              "keep_alive_s": int(keep_alive_s), "max_instances": max_instances}
    for file in TARGET_FILES[target]:
        (d / file).write_text(_render(target, file, **values))


def _write_openfaas_stack(out: Path, names: list[str], keep_alive_s: float, max_instances: int,
                          secret: str) -> None:
    lines = [f"# first: faas-cli secret create {secret} --from-file {TOKEN_FILE}",
             "version: 1.0", "provider:", "  name: openfaas", "  gateway: http://127.0.0.1:8080", "functions:"]
    for n in names:
        lines += [f"  {n}:", "    lang: python3-http", f"    handler: ./functions/{n}",
                  f"    image: registry.example.com/{n}:latest", "    secrets:", f"      - {secret}", "    labels:",
                  '      com.openfaas.scale.zero: "true"',
                  f'      com.openfaas.scale.zero-duration: "{int(keep_alive_s)}s"',
                  f'      com.openfaas.scale.max: "{max_instances}"']
    (out / "stack.yml").write_text("\n".join(lines) + "\n")
