"""The `ray` platform: the embedded platform's host pool, with every host a Ray actor placed by Ray.

A host is a long-lived process that loads any number of expert functions and answers a MoE layer's
calls to it in one request (see `faasmoe.platforms.local.host`); here it is a Ray actor, so Ray
places it on a node of the cluster (spread over the nodes), starts its process, and ends it. The pool's
policy is the embedded platform's, unchanged: a function's cold start on a running host is a
weight load (milliseconds), a function idle for keep-alive is unloaded, a host left holding nothing
is killed (scale to zero), a batch that waits for a busy host gets a new one (up to
`max_instances`), and a call whose host died is retried on another, which Ray may place on
another node.

The data path does not go through Ray: once started, the actor listens on a TCP socket of its node
and the platform sends it the same length-prefixed requests as a local host's Unix socket. Measured
on this machine (scripts/ray-data-paths.py, a 4 KiB request echoed, medians): a direct socket 0.03 ms,
a Ray actor call 0.8 ms, a Ray Serve handle call to a multiplexed deployment 4 ms. Only the platform
may talk to a host: a host admits one connection, the first to send its own random token (given to the
actor at creation) within 5 s, then closes its listener.

Locally, Ray is started on 127.0.0.1 without a dashboard; with an address the platform joins that
cluster, whose nodes need faasmoe installed and the checkpoint at the same path. A host's own cold
start is a new Ray worker process that imports torch (seconds); it is paid once per host, not per
function, and the hosts a batch needs are created together (`_launch`), so they start side by side.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from faasmoe.metering.meter import Label, note_exit
from faasmoe.platforms.base import PlatformConfig
from faasmoe.platforms.local.platform import InstanceStartError, LocalPlatform, _Host
from faasmoe.platforms.local.transport import send_frame

AVOID_FAILED_NODE_S = 60.0  # a node where a host failed gets new hosts only if no other node is left, this long
OBJECT_STORE_BYTES = 256 * 2**20  # a local Ray's object store: nothing goes through it but the actors' replies
log = logging.getLogger(__name__)


class HostActor:
    """A host in a Ray worker process: warms the kernels of the function shapes it may load (one expert of one
    function per shape, its pages only), listens on a TCP socket of its node and answers the platform's requests
    from a thread (the actor's own methods stay free for Ray)."""

    def __init__(self, name: str, threads: int, warm: list[dict], token: bytes, hang_on_request: int = 0,
                 compiled: bool = False):
        import ray
        import torch

        from faasmoe.platforms.local import host
        from faasmoe.platforms.local.zygote import _warm_up
        from faasmoe.proctitle import set_title

        set_title("function", "host", name)
        torch.set_num_threads(threads)
        warmed: set[tuple] = set()
        for spec in warm:
            _warm_up(spec, warmed, compiled)
        ip = ray.util.get_node_ip_address()
        self.sock = socket.create_server((ip, 0), backlog=16)
        self.address = f"{ip}:{self.sock.getsockname()[1]}"
        threading.Thread(target=host.serve_connections, args=(self.sock, host.Host(compiled), hang_on_request, token),
                         name="faasmoe-host", daemon=True).start()

    def where(self) -> tuple[str, int, str]:
        """(address, pid, node id): where the platform connects, and what it meters."""
        import ray

        return self.address, os.getpid(), ray.get_runtime_context().get_node_id()


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


class RayPlatform(LocalPlatform):
    name = "ray"

    def __init__(self, config: PlatformConfig | None = None, address: str | None = None,
                 test_hooks: dict | None = None):
        super().__init__(config, test_hooks)
        if self.config.memory_budget is not None:  # its accounting and page-cache drops are this machine's
            raise ValueError("a memory budget applies to the local platform only")
        self.address = address
        self._actor_class = None
        self._started_ray = False
        self._cluster_cores = 1
        self._nodes: dict[str, str] = {}  # host name -> the Ray node chosen for it (starting or running)
        self._failed_at: dict[str, float] = {}  # node -> when a host there last failed to start or was lost
        self._starts: dict[str, tuple] = {}  # host name -> (actor, its where() reference, token) while starting
        self._killer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faasmoe-ray-kill")  # off the lock

    # -- lifecycle ---------------------------------------------------------------------------
    def _boot(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError as e:
            raise RuntimeError("the ray platform needs Ray: pip install 'faasmoe[ray]'") from e
        if ray.is_initialized():
            if self.address:
                log.warning("Ray is initialised in this process already: using that Ray, not %s", self.address)
        else:
            kwargs = dict(namespace="faasmoe", log_to_driver=False, configure_logging=False)
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
                         object_store_memory=OBJECT_STORE_BYTES, **kwargs)
                self._started_ray = True
        self._cluster_cores = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # num_cpus=0: a host's core is not reserved (hosts are few and often idle); `_place` picks its node; no
        # restarts: a host that died is replaced by the pool, which retries its calls
        self._actor_class = ray.remote(num_cpus=0, max_restarts=0)(HostActor)

    def _cores(self) -> int:
        return self._cluster_cores

    def shares_host_cores(self) -> bool:
        return not self.address  # a local Ray's hosts are processes on this machine

    def close(self) -> None:
        ours = self._ray_processes() if self._started_ray else []
        super().close()
        self._killer.shutdown(wait=True)
        if self._started_ray:
            try:
                import ray

                ray.shutdown()
            except Exception:  # closing must not raise on a Ray that is already gone
                pass
            _reap(ours)

    def _ray_processes(self) -> list:
        """Every process of the Ray this platform started: its node processes (GCS, raylet, monitors, ...; the
        session folder is in their command line) and their descendants (agents, workers, hosts)."""
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

    # -- hosts -------------------------------------------------------------------------------
    def _launch(self, host: _Host) -> None:
        """Create the host's actor now, so that the hosts a batch needs start side by side (each takes seconds);
        a failure here is met again, and reported, by `_start`."""
        try:
            self._create_actor(host)
        except Exception:  # noqa: BLE001 - see above
            pass

    def _create_actor(self, host: _Host) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._actor_class is None:
            raise InstanceStartError("the platform is not started")
        with self._lock:
            if host not in self._hosts:
                raise InstanceStartError(f"host {host.name} was stopped while it started")
            if host.name in self._starts or host.actor is not None:
                return
        node = self._place(host)
        # hard affinity: with soft=True, and with Ray's SPREAD strategy, Ray was seen putting three hosts on one
        # of three nodes
        strategy = NodeAffinitySchedulingStrategy(node, soft=False) if node else "DEFAULT"
        token = secrets.token_bytes(32)  # one per host: a host's token opens no other
        actor = self._actor_class.options(scheduling_strategy=strategy).remote(
            host.name, self.config.threads_per_instance, host.warm, token, self._hang_on, self.config.compile_experts)
        with self._lock:
            stopped = host not in self._hosts
            if stopped:
                self._nodes.pop(host.name, None)  # `_end` ran before `_place` counted it
            else:
                host.actor = actor
                self._starts[host.name] = (actor, actor.where.remote(), token)
        if stopped:
            self._kill(actor)
            raise InstanceStartError(f"host {host.name} was stopped while it started")

    def _start(self, host: _Host) -> None:
        """Wait until the host's actor listens (a new worker process: seconds), creating it if `_launch` did not."""
        import ray

        try:
            self._create_actor(host)
        except InstanceStartError:
            raise
        except Exception as e:  # Ray could not be asked (its control store unreachable, ...)
            raise InstanceStartError(f"host {host.name} could not be created on Ray: {type(e).__name__}: {e}"
                                     [:500]) from e
        with self._lock:
            started = self._starts.get(host.name)
        if started is None:
            raise InstanceStartError(f"host {host.name} was stopped while it started")
        _, where, _ = started
        left = host.spawned_at + self.config.cold_start_timeout_s - time.perf_counter()
        try:
            address, pid, node = ray.get(where, timeout=max(0.1, left))
        except Exception as e:  # the actor's constructor failed, its node died, or it took too long
            raise InstanceStartError(f"host {host.name} did not start on Ray: {type(e).__name__}: {e}"[:500]) from e
        with self._lock:
            if host not in self._hosts:  # stopped meanwhile: `_end` has forgotten it already
                raise InstanceStartError(f"host {host.name} was stopped while it started")
            host.path, host.pid = address, pid
            self._nodes[host.name] = node

    def _place(self, host: _Host) -> str | None:
        """The alive node (with CPUs, if any has) running fewest of our hosts, started or starting, for a new
        one: the pool spreads over the cluster. A node where a host failed lately only if no other is left
        (Ray may list a node as alive for seconds after it died)."""
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        with_cpus = [n["NodeID"] for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0]
        alive = with_cpus or [n["NodeID"] for n in nodes]
        now = time.monotonic()
        with self._lock:
            self._cluster_cores = max(1, int(sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)))
            trusted = [n for n in alive if now - self._failed_at.get(n, -AVOID_FAILED_NODE_S) >= AVOID_FAILED_NODE_S]
            candidates = trusted or alive
            if not candidates:
                return None
            load = {n: 0 for n in candidates}
            for node in self._nodes.values():
                if node in load:
                    load[node] += 1
            node = min(candidates, key=lambda n: load[n])
            self._nodes[host.name] = node
        return node

    def _connect(self, host: _Host, deadline: float) -> socket.socket:
        with self._lock:
            started = self._starts.pop(host.name, None)
        if started is None:
            raise InstanceStartError(f"host {host.name} was stopped while it started")
        token = started[2]
        ip, port = host.path.rsplit(":", 1)
        try:
            sock = socket.create_connection((ip, int(port)), timeout=max(0.1, deadline - time.perf_counter()))
        except OSError as e:
            raise InstanceStartError(f"host {host.name} at {host.path} refused the connection: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_frame(sock, token)  # the host answers READY only after it
        except BaseException:
            sock.close()
            raise
        return sock

    def _end(self, host: _Host) -> None:
        """(Caller holds the lock.) Forget the host and have its actor killed, off the lock (a call to Ray's
        control store)."""
        if host.pid is not None and not self.address:
            note_exit(host.pid)  # a local Ray's host: its final CPU counter, for this process's meters
        if host.actor is not None:
            self._kill(host.actor)
            host.actor = None
        self._nodes.pop(host.name, None)
        self._starts.pop(host.name, None)

    def _kill(self, actor) -> None:
        """Have the actor killed, off the caller's thread (a call to Ray's control store)."""
        try:
            self._killer.submit(_kill_actor, actor)
        except RuntimeError:  # closed: a Ray this platform started is shut down by now, which ended the actor
            if not self._started_ray:  # a cluster's: kill it (ray.kill would start a Ray if none were running)
                _kill_actor(actor)

    def _fail(self, req, error: Exception | None) -> None:
        """As the embedded platform, and a host that could not start or whose connection broke marks its node to
        be avoided for a while (a call that timed out, on a slow but healthy node, does not)."""
        lost = isinstance(error, (InstanceStartError, OSError)) and not isinstance(error, TimeoutError)
        if lost and not self._closed.is_set():
            with self._lock:
                node = self._nodes.get(req.host.name)
                if node:
                    self._failed_at[node] = time.monotonic()
        super()._fail(req, error)

    # -- introspection -----------------------------------------------------------------------
    def placement(self) -> dict[str, tuple[int | None, str]]:
        """Running hosts: name -> (pid on its node, Ray node id)."""
        with self._lock:
            return {h.name: (h.pid, self._nodes[h.name]) for h in self._hosts
                    if h.sock is not None and h.name in self._nodes}

    def processes(self) -> dict[int, Label]:
        """Host processes and, for a Ray this platform started, Ray's own (GCS, raylet, workers, ...); on a
        cluster's nodes, pids of this machine would be wrong, so none."""
        if self.address:
            return {}
        hosts = {pid: Label("function") for pid in self.hosts()}
        ray_procs: dict[int, Label] = {}
        for p in self._ray_processes():
            ray_procs[p.pid] = Label("ray")
        return ray_procs | hosts


def _kill_actor(actor) -> None:
    import ray

    if not ray.is_initialized():  # shut down: its actors are gone (and ray.kill would start a new Ray)
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # an actor Ray has already lost, or a Ray already shut down
        pass
