"""Connecting to a Ray cluster: a local one started here, or a running one by address.

Addresses (``--ray ADDRESS``):

- ``local``: start a one-node cluster in this process, with this machine's cores; it stops when
  the command ends. It listens on loopback only, and runs without Ray's memory monitor (which
  kills workers when the whole machine is nearly full, whoever fills it).
- ``auto``: the cluster already running on this machine (``ray start --head``).
- ``HOST:PORT``: the head node's GCS address (``ray start --head`` prints it; port 6379 by default).
- ``ray://HOST:PORT``: a Ray Client server (port 10001 by default).

An address is probed with a plain TCP connect first (``timeout`` seconds), so that a wrong address
fails in seconds: ``ray.init`` itself retries an unreachable GCS for minutes.

Every node must have llmopt and its dependencies installed, the same version as the driver. The
driver's own llmopt directory is put on the workers' import path too, so a source checkout works
without installing it on a one-machine cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'llmopt[ray]'"
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
# Ray's memory monitor kills workers when the *machine* is nearly full, whoever fills it; on a
# shared machine that kills engines for other programs' memory, so a local cluster starts without
# it (the kernel's OOM killer still guards the machine). Ray's processes read it at start.
MEMORY_MONITOR_ENV = "RAY_memory_monitor_refresh_ms"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RayUnavailable(RuntimeError):
    """Ray is not installed (it is the optional extra ``ray``)."""


class ClusterUnreachable(RuntimeError):
    """Nothing answers at the given cluster address."""


def require_ray() -> ModuleType:
    """``import ray``, or RayUnavailable naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"Ray is not installed; it is an optional extra: {EXTRA_HINT}") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``ray://HOST:PORT`` -> (host, port); a missing port is Ray's default."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    default = DEFAULT_CLIENT_PORT if address.startswith("ray://") else DEFAULT_GCS_PORT
    if rest.startswith("["):  # [::1]:6379
        host, _, tail = rest[1:].partition("]")
        port_s = tail.lstrip(":")
    elif rest.count(":") == 1:
        host, port_s = rest.split(":")
    else:
        host, port_s = rest, ""
    if not host:
        raise ValueError(f"--ray {address!r}: no host; give HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or 'local'")
    if port_s and (not port_s.isdigit() or not 0 < int(port_s) < 65536):
        raise ValueError(f"--ray {address!r}: the port {port_s!r} is not a number in 1..65535")
    return host, int(port_s) if port_s else default


def probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast (ClusterUnreachable) when no TCP server listens at ``address``."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({host}:{port}: {reason} within {timeout:g} s): start one "
            f"there with `ray start --head --port {port}`, check the address, or use --ray local to start "
            f"one on this machine") from None


@dataclass
class Cluster:
    """The cluster this process is connected to."""

    address: str  # the GCS address workers and other drivers reach it by
    started_here: bool  # a local cluster this process started (and stops in ``shutdown``)
    connected_here: bool  # this process called ray.init (and ray.shutdown in ``shutdown``)
    cpus: int  # CPUs of the alive nodes
    node_cpus: list[int]  # CPUs per alive node

    @property
    def nodes(self) -> int:
        return len(self.node_cpus)

    def shutdown(self) -> None:
        if self.connected_here:
            require_ray().shutdown()


@contextlib.contextmanager
def _loopback_mode() -> Iterator[None]:
    """Keep a one-machine cluster on loopback. Ray swaps 127.0.0.1 for the machine's routable
    address (to let other nodes join) unless its single-machine mode, meant for Windows and macOS,
    is on; that switch is read from the environment when Ray is imported, so it is set on the module
    for the duration of ``ray.init``."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment (inherited by the Ray processes it starts)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _code_path() -> str:
    return str(Path(__file__).resolve().parents[2])  # the directory holding the llmopt package


def _describe(ray: Any, started: bool, connected: bool) -> Cluster:
    node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client connections have no GCS address of their own
        address = "(ray client)"
    return Cluster(address, started, connected, sum(node_cpus), node_cpus)


def connect(address: str = "local", *, num_cpus: int | None = None, timeout: float = 5.0) -> Cluster:
    """Connect to (or start) a cluster; see the module doc for ``address``. A process that is
    already connected (``ray.init`` was called, e.g. by a test) keeps its connection."""
    ray = require_ray()
    if ray.is_initialized():
        return _describe(ray, False, False)
    from ray.job_config import JobConfig

    path = os.pathsep.join(p for p in (_code_path(), os.environ.get("PYTHONPATH")) if p)
    job = JobConfig(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}})
    common: dict[str, Any] = dict(job_config=job, logging_level=logging.WARNING, log_to_driver=True)
    if address == "local":
        from llmopt.config import usable_cpus

        with _loopback_mode(), _env(MEMORY_MONITOR_ENV, "0"):
            ray.init(address="local", num_cpus=num_cpus or usable_cpus(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", **common)
        c = _describe(ray, True, True)
    elif address == "auto":
        try:
            ray.init(address="auto", **common)
        except ConnectionError as e:
            raise ClusterUnreachable(f"--ray auto: no Ray cluster runs on this machine ({e}); start one with "
                                     f"`ray start --head`, give its HOST:PORT, or use --ray local") from None
        c = _describe(ray, False, True)
    else:
        probe(address, timeout)
        host = parse_address(address)[0]
        with _loopback_mode() if host in LOOPBACK else contextlib.nullcontext():
            ray.init(address=address, **common)
        c = _describe(ray, False, True)
    log.info("ray cluster %s: %d node(s), %d CPUs%s", c.address, c.nodes, c.cpus,
             " (started here)" if c.started_here else "")
    return c


def plan_workers(cluster: Cluster, workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads per worker) that fit ``cluster``: by default one single-thread worker per
    CPU; with ``workers`` alone, the CPUs shared out among them (at most one node's worth each)."""
    if (workers is not None and workers < 1) or (threads is not None and threads < 1):
        raise ValueError(f"--workers and --threads-per-worker must be >= 1, got {workers} and {threads}")
    if cluster.cpus < 1:
        raise ValueError(f"the Ray cluster at {cluster.address} has no CPUs; add nodes with `ray start "
                         "--address HEAD:PORT`")
    biggest = max(cluster.node_cpus)
    if threads is None:
        threads = 1 if workers is None else max(1, min(biggest, cluster.cpus // workers))
    fits = sum(c // threads for c in cluster.node_cpus)  # a worker's threads stay on one node
    if workers is None:
        workers = fits
    if threads > biggest or workers > fits:
        raise ValueError(f"{workers} workers x {threads} threads do not fit the cluster at {cluster.address} "
                         f"(nodes with {', '.join(map(str, cluster.node_cpus))} CPUs: room for {fits} workers of "
                         f"{threads} threads); lower --workers or --threads-per-worker, or add nodes")
    return workers, threads
