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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file

from faasmoe.checkpoint import Checkpoint, read_safetensors_header
from faasmoe.functions.packing import contiguous_blocks
from faasmoe.functions.spec import FunctionSpec, function_specs
from faasmoe.weights import map_tensors, torch_dtype

Target = Literal["tinyfaas", "openfaas", "knative"]
TARGETS = ("tinyfaas", "openfaas", "knative")

# The handler's own code, vendored into every package (it imports nothing else of faasmoe).
VENDORED = ["functions/wire.py", "functions/expert.py", "functions/spec.py", "functions/http_server.py",
            "weights.py", "checkpoint.py"]

DEFAULT_URLS = {
    "tinyfaas": "http://127.0.0.1:8000/{name}",
    "openfaas": "http://127.0.0.1:8080/function/{name}",
    "knative": "http://{name}.default.example.com/",
}

REQUIREMENTS = "numpy\n--extra-index-url https://download.pytorch.org/whl/cpu\ntorch==2.13.0\n"


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
    dtype = dtype or ckpt.dtype
    specs = function_specs(ckpt, contiguous_blocks(ckpt.config.num_experts, experts_per_function), dtype)
    out = Path(out)
    (out / "functions").mkdir(parents=True, exist_ok=True)
    template = base_url or DEFAULT_URLS[target]
    functions = {}
    for i, spec in enumerate(specs):
        name = function_name(spec)
        d = out / "functions" / name
        d.mkdir(exist_ok=True)
        _vendor(d)
        spec_json = spec.to_json()
        if copy_weights:  # self-contained: the function ships only its own tensors
            tensors = map_tensors(spec.tensors, torch_dtype(dtype))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "weights.safetensors"))
            locs = read_safetensors_header(d / "weights.safetensors")
            spec_json["tensors"] = [{**locs[t.name].to_json(), "file": "weights.safetensors"} for t in spec.tensors]
        (d / "spec.json").write_text(json.dumps(spec_json, indent=1))
        (d / "requirements.txt").write_text(REQUIREMENTS)
        _write_target(target, d, name, keep_alive_s, max_instances)
        functions[spec.id] = {"name": name, "layer": spec.layer, "block": spec.block, "experts": list(spec.experts),
                              "url": template.format(name=name, port=start_port + i, index=i),
                              "port": start_port + i}
    if target == "openfaas":
        _write_openfaas_stack(out, [f["name"] for f in functions.values()], keep_alive_s, max_instances)
    manifest = {"model": ckpt.digest, "checkpoint": str(ckpt.path), "experts_per_function": experts_per_function,
                "dtype": dtype, "target": target, "encoding": "base64" if target == "tinyfaas" else "binary",
                "functions": functions}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def _vendor(d: Path) -> None:
    src = Path(__file__).resolve().parent
    for rel in VENDORED:
        dst = d / "faasmoe" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
    for pkg in (d / "faasmoe", d / "faasmoe" / "functions"):
        (pkg / "__init__.py").write_text("")


def _write_target(target: str, d: Path, name: str, keep_alive_s: float, max_instances: int) -> None:
    if target == "tinyfaas":
        (d / "fn.py").write_text('''"""tinyFaaS entry point: payloads are strings, so frames travel base64-encoded."""
import base64
import os

from faasmoe.functions.http_server import FunctionServer, load_spec

_server = FunctionServer(load_spec(os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec.json")))


def fn(input: str, headers: dict) -> str:
    reply, _ = _server.call(base64.b64decode(input))
    return base64.b64encode(reply).decode()
''')
        (d / "README.md").write_text(f"Upload to tinyFaaS: zip this folder and POST it to the management service:\n\n"
                                     f"    zip -r {name}.zip . && curl http://<host>:8080/upload --data "
                                     f"\"{{\\\"name\\\": \\\"{name}\\\", \\\"env\\\": \\\"python3\\\", "
                                     f"\\\"threads\\\": 1, \\\"zip\\\": \\\"$(base64 -w 0 {name}.zip)\\\"}}\"\n")
    elif target == "openfaas":
        (d / "handler.py").write_text('''"""OpenFaaS python3-http template handler: the body is a faasmoe wire frame."""
import os

from faasmoe.functions.http_server import FunctionServer, load_spec

_server = FunctionServer(load_spec(os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec.json")))


def handle(event, context):
    reply, headers = _server.call(event.body)
    return {"statusCode": 200, "body": reply, "headers": {"Content-Type": "application/octet-stream", **headers}}
''')
    elif target == "knative":
        (d / "Dockerfile").write_text('''FROM python:3.11-slim
WORKDIR /function
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV PORT=8080
CMD ["sh", "-c", "python -m faasmoe.functions.http_server --spec spec.json --host 0.0.0.0 --port $PORT"]
''')
        (d / "service.yaml").write_text(f'''apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {name}
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/min-scale: "0"
        autoscaling.knative.dev/max-scale: "{max_instances}"
        autoscaling.knative.dev/scale-to-zero-pod-retention-period: "{int(keep_alive_s)}s"
    spec:
      containerConcurrency: 1
      containers:
        - image: registry.example.com/{name}:latest
          ports:
            - containerPort: 8080
''')


def _write_openfaas_stack(out: Path, names: list[str], keep_alive_s: float, max_instances: int) -> None:
    lines = ["version: 1.0", "provider:", "  name: openfaas", "  gateway: http://127.0.0.1:8080", "functions:"]
    for n in names:
        lines += [f"  {n}:", "    lang: python3-http", f"    handler: ./functions/{n}",
                  f"    image: registry.example.com/{n}:latest", "    labels:",
                  '      com.openfaas.scale.zero: "true"',
                  f'      com.openfaas.scale.zero-duration: "{int(keep_alive_s)}s"',
                  f'      com.openfaas.scale.max: "{max_instances}"']
    (out / "stack.yml").write_text("\n".join(lines) + "\n")
