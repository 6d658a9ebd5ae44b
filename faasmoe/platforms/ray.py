"""The `ray` platform: every expert function a Ray Serve deployment that autoscales from zero replicas.

Same handler, same wire format: a replica wraps `ExpertFunction` and answers frames. PlatformConfig maps
onto Serve's autoscaling: max_instances -> max_replicas; one call at a time per replica ->
max_ongoing_requests 1; min_replicas 0 and initial_replicas 0 (scale to zero, cold start on demand);
keep-alive -> downscale delay; upscale delay and metric intervals cut so that a first call is not held
for Serve's defaults. Serve's own policy samples ongoing requests, which a millisecond call almost never
shows, so it would scale a busy deployment to zero: `KeepAlivePolicy` counts the calls each replica
reports (`record_autoscaling_stats`) instead and scales to zero only after keep-alive seconds without a
call, the FaaS keep-alive. A replica is a fresh Ray worker process, so its cold start costs seconds, not
the embedded platform's milliseconds (docs/benchmarks.md, section 3). The control plane calls replicas
through deployment handles; no HTTP proxy is started.

Cold starts and warm hits come from the replicas themselves (each reply says whether it was its
replica's first call); evictions and running replicas from polling `serve.status()`. Locally, Ray is
started on 127.0.0.1 without a dashboard; with an address it joins that cluster, whose nodes need
faasmoe installed and the checkpoint at the same path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

from faasmoe.functions.spec import FunctionSpec
from faasmoe.metering.meter import Label
from faasmoe.platforms.base import InstanceInfo, InvocationError, Platform, PlatformConfig

APP = "faasmoe"
MIN_SENSIBLE_KEEP_ALIVE_S = 30
OBJECT_STORE_BYTES = 256 * 2**20  # a local Ray's object store: frames go through handles, a little is plenty
log = logging.getLogger(__name__)


def keep_alive_policy(ctx, keep_alive_s: float = 30.0) -> tuple[int, dict]:
    """Serve autoscaling policy: replicas for the queue now, and none only after keep_alive_s idle.

    Runs in the Serve controller. Activity is any of: requests at the handles, a replica's call
    counter (`calls`) growing (it drops when a replica goes, which is not activity), a scale-up (Serve's cold-start fast path starts a replica without
    asking this policy, and while it starts the handles' request count can read 0), or replicas
    still starting. Without the last two a deployment went back to zero while its first replica
    was starting (measured: a private-mode server on Ray never finished a request).
    """
    import math

    state = dict(ctx.policy_state or {})
    now = ctx.current_time or time.time()
    metrics = ctx.aggregated_metrics or {}
    calls = float(sum(metrics.get("calls", {}).values()))
    demand = float(ctx.total_num_requests or 0.0)
    active = [state.get("active_at", -math.inf), ctx.last_scale_up_time or -math.inf]
    if demand > 0 or calls > state.get("calls", 0.0) or ctx.current_num_replicas < ctx.target_num_replicas:
        active.append(now)
    state["active_at"], state["calls"] = max(active), calls
    if now - state["active_at"] > keep_alive_s:
        return 0, state
    target = ctx.config.get_target_ongoing_requests() if ctx.config else 1.0
    return max(1, math.ceil(demand / target)), state


class KeepAlivePolicy:
    """`keep_alive_policy` as a class, because Serve passes `policy_kwargs` (the keep-alive) only to a class
    policy; a function policy would always get the default."""

    def __init__(self, keep_alive_s: float = 30.0):
        self.keep_alive_s = keep_alive_s

    def __call__(self, ctx) -> tuple[int, dict]:
        return keep_alive_policy(ctx, self.keep_alive_s)


class ExpertReplica:
    """The Serve deployment class: one replica = one instance of an expert function."""

    def __init__(self, spec_json: dict, threads: int = 1):
        import torch

        from faasmoe.functions.expert import ExpertFunction

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.fn = ExpertFunction(FunctionSpec.from_json(spec_json))
        self.load_s = time.perf_counter() - t0
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.calls = 0

    def __call__(self, frame: bytes) -> tuple[bytes, str, bool, float, int]:
        cold = self.calls == 0
        self.calls += 1
        return self.fn.handle(frame), self.replica, cold, self.load_s, os.getpid()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: calls so far (keep_alive_policy watches it change)."""
        return {"calls": float(self.calls)}


def _reap(procs: list, grace_s: float = 5.0) -> None:
    """Give Ray's processes grace_s to exit after `ray.shutdown()`, then SIGKILL the rest: the dashboard and
    runtime-env agents have been seen outliving their raylet, even a SIGTERM."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def deployment_name(function_id: str) -> str:
    return function_id.replace(".", "-")


class RayPlatform(Platform):
    name = "ray"

    def __init__(self, config: PlatformConfig, address: str | None = None):
        super().__init__(config)
        self.address = address
        self._pending: list[FunctionSpec] = []
        self._deployed: dict[str, FunctionSpec] = {}
        self._handles: dict[str, object] = {}
        self._replicas: dict[str, dict[str, int]] = {}  # function -> replica id -> pid (seen answering)
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started_ray = False
        self._poller: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        push = str(self._metrics_interval())
        metrics_env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": push,
                       "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": push}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for k, v in metrics_env.items():  # read by Serve at import, in this process and in Ray's
            os.environ.setdefault(k, v)
        try:
            import ray
            from ray import serve
        except ImportError as e:
            raise RuntimeError("the ray platform needs Ray Serve: pip install 'faasmoe[ray]'") from e
        if self.config.keep_alive_s < MIN_SENSIBLE_KEEP_ALIVE_S:
            log.warning("keep-alive %.0f s on Ray, where a cold start takes seconds (more under load): a "
                        "layer's functions can go to zero while the next layer's start, and every step cold-"
                        "starts again; %d s or more is advised", self.config.keep_alive_s,
                        MIN_SENSIBLE_KEEP_ALIVE_S)
        if not ray.is_initialized():
            kwargs = dict(namespace="faasmoe", log_to_driver=False, configure_logging=False)
            if self.address:  # a cluster's workers get the settings through the job's runtime env
                ray.init(address=self.address, runtime_env={"env_vars": metrics_env}, **kwargs)
            else:  # a local Ray inherits this environment: no runtime env, so Ray's prestarted workers fit
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
                         object_store_memory=OBJECT_STORE_BYTES, **kwargs)
                self._started_ray = True
        serve.start(proxy_location="Disabled")
        self._poller = threading.Thread(target=self._poll, name="faasmoe-ray-status", daemon=True)
        self._poller.start()

    def shares_host_cores(self) -> bool:
        return not self.address  # a local Ray's replicas are processes on this machine

    def _metrics_interval(self) -> float:
        """How often handles and replicas report to Serve's autoscaler (Serve's default, 10 s, is no FaaS)."""
        return max(0.1, min(1.0, self.config.keep_alive_s / 4))

    def deploy(self, spec: FunctionSpec) -> None:
        """Queued; `finish_deploy` (or the first call) deploys every queued function in one application update."""
        with self._lock:
            if spec.id not in self._deployed:
                self._deployed[spec.id] = spec
                self._pending.append(spec)
                self.log.deployed(spec.id, spec.nbytes)

    def finish_deploy(self) -> None:
        self._flush()

    def _flush(self) -> None:
        from ray import serve

        with self._lock:
            if not self._pending:
                return
            self._pending.clear()
            specs = list(self._deployed.values())
        c = self.config
        interval = self._metrics_interval()
        autoscaling = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": c.max_instances,
                       "target_ongoing_requests": 1, "upscale_delay_s": 0.0, "metrics_interval_s": interval,
                       "look_back_period_s": 2 * interval,
                       "downscale_delay_s": c.keep_alive_s, "downscale_to_zero_delay_s": 0.0,
                       "policy": {"policy_function": "faasmoe.platforms.ray:KeepAlivePolicy",
                                  "policy_kwargs": {"keep_alive_s": c.keep_alive_s}}}
        replica = serve.deployment(ExpertReplica)
        bound = [replica.options(name=deployment_name(s.id), max_ongoing_requests=1, autoscaling_config=autoscaling,
                                 ray_actor_options={"num_cpus": 0})
                 .bind(s.to_json(), c.threads_per_instance) for s in specs]

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
        class Index:  # Serve needs one ingress per application; it only keeps the functions in the app
            def __init__(self, *functions):
                self.count = len(functions)

            def __call__(self) -> int:
                return self.count

        serve.run(Index.bind(*bound), name=APP, route_prefix=None)
        with self._lock:
            for s in specs:
                self._handles[s.id] = serve.get_deployment_handle(deployment_name(s.id), app_name=APP)

    def close(self) -> None:
        self._stop.set()
        ours = self._ray_processes() if self._started_ray else []
        try:
            from ray import serve

            if self._deployed:
                serve.delete(APP)
            if self._started_ray:
                import ray

                serve.shutdown()
                ray.shutdown()
        except Exception:  # closing must not raise on a Ray that is already gone
            pass
        _reap(ours)

    def _ray_processes(self) -> list:
        """Every process of the Ray this platform started: its node processes (GCS, raylet, monitors, ...; the
        session folder is in their command line) and their descendants (agents, Serve controller, replicas)."""
        import psutil

        try:
            import ray

            session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
            out = []
            for p in psutil.Process().children():
                if session in " ".join(p.cmdline()):
                    out += [p, *p.children(recursive=True)]
            return out
        except Exception:  # a private API that moved, a process that just went: close as before
            return []

    # -- invocation --------------------------------------------------------------------------
    def submit(self, calls: Sequence[tuple[str, bytes]]) -> list[list]:
        self._flush()
        batch = []
        for fid, frame in calls:
            handle = self._handles.get(fid)
            if handle is None:
                raise KeyError(f"function {fid} is not deployed")
            self.log.invoked(fid)
            batch.append([fid, frame, handle.remote(frame), time.perf_counter(), []])
        return batch

    def gather(self, batch: list[list]) -> list[bytes]:
        out = []
        for item in batch:
            fid, frame, response, t0, errors = item
            while True:
                try:
                    reply, replica, cold, load_s, pid = response.result(timeout_s=self.config.invoke_timeout_s)
                    break
                except Exception as e:  # replica died or timed out: Serve routes the retry elsewhere
                    kind = "timeout" if isinstance(e, TimeoutError) else "crash"
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                    self.log.event(kind, fid, "?", time.perf_counter() - t0)
                    if len(errors) > self.config.max_retries:
                        raise InvocationError(f"function {fid} failed after {len(errors)} attempts on Ray: "
                                              + "; ".join(errors)) from e
                    self.log.retried(fid)
                    t0 = time.perf_counter()
                    response = self._handles[fid].remote(frame)
            dt = time.perf_counter() - t0
            self.log.called(fid, dt)
            with self._lock:
                self._replicas.setdefault(fid, {})[replica] = pid
            self.log.event("cold_start" if cold else "warm_hit", fid, replica, dt, load_s if cold else None)
            out.append(reply)
        return out

    # -- observation -------------------------------------------------------------------------
    def _poll(self, period: float = 0.5) -> None:
        """Running replicas per function from Serve; a drop is an eviction (scale-down)."""
        from ray import serve

        while not self._stop.wait(period):
            try:
                app = serve.status().applications.get(APP)
            except Exception:
                continue
            if app is None:
                continue
            by_name = {deployment_name(fid): fid for fid in self._deployed}
            for name, d in app.deployments.items():
                fid = by_name.get(name)
                if fid is None:
                    continue
                running = int(d.replica_states.get("RUNNING", 0))
                with self._lock:
                    before = self._running.get(fid, 0)
                    self._running[fid] = running
                    self.log.instances_now(fid, running)
                    for _ in range(before - running):
                        self.log.event("eviction", fid, "?", self.config.keep_alive_s)
                    if running == 0:
                        self._replicas.pop(fid, None)

    def instances(self) -> list[InstanceInfo]:
        with self._lock:
            return [InstanceInfo(fid, rid, pid, False, 0.0, 0.0) for fid, reps in self._replicas.items()
                    for rid, pid in reps.items() if self._running.get(fid, 0) > 0]

    def running_replicas(self) -> dict[str, int]:
        with self._lock:
            return dict(self._running)

    def processes(self) -> dict[int, Label]:
        """Replica processes seen answering (functions) and, for a Ray this platform started, Ray's own."""
        import psutil

        out: dict[int, Label] = {}
        if not self._started_ray:
            return {i.pid: Label("function") for i in self.instances() if i.pid}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "ServeReplica:faasmoe" in cmd and "Index" not in cmd:
                out[p.pid] = Label("function")
            elif "ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd or "/ray/" in cmd):
                out[p.pid] = Label("ray")
        return out
