"""Run untrusted Python (model-written code) in a separate, limited, throw-away process.

Layers, each named in ``SandboxResult.isolation`` when the machine supports it:

``process-group``
    ``python -I`` (isolated mode: no PYTHON* variables, no user site, no script directory on
    sys.path) in a new session; on timeout or exit the whole process group gets SIGKILL.
``rlimits``
    set by a trusted bootstrap before the program's first line: RLIMIT_AS (memory), RLIMIT_CPU,
    RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, no core files. The program arrives on stdin, so
    nothing of it is written to disk by us.
``netns``, ``pidns``, ``mountns``, ``minroot`` (``unshare``, as root or in an unprivileged user
namespace)
    a network namespace with no interface up, not even loopback, so every connect fails; a PID
    namespace whose processes all die with its first one, so a child that calls setsid() still
    cannot outlive the run, with a ``/proc`` mounted fresh inside it, so the program sees its own
    processes only (not the host's, nor their command lines); a mount namespace whose root is
    a new tmpfs (``pivot_root``, the host's tree is detached) holding only read-only bind mounts
    of ``/usr``, the ``/lib*`` and ``/bin`` directories, the interpreter's installation and
    ``/etc/ld.so.cache``, a few device nodes (null, zero, full, random, urandom) and fresh
    size-limited tmpfs on ``/tmp``, ``/var/tmp`` and ``/dev/shm``. Nothing else of the host is
    visible: no ``/etc/passwd``, no home directories, no checkout, no ``/sys``. The working
    directory, HOME and TMPDIR are ``/tmp/sandbox`` on that tmpfs: the program can write nowhere
    else, and what it wrote is gone when the namespace dies.
``uid:65534`` (as root)
    the interpreter is started by ``setpriv`` as nobody, no supplementary groups, no_new_privs:
    the program cannot touch files it does not own, and RLIMIT_NPROC is enforced (the kernel
    does not enforce it on root).

The interpreter is the base installation (never a virtualenv) of the first of ``sys.executable``,
``python3`` on PATH and ``/usr/bin/python3`` that finds its own standard library inside the
sandbox (as nobody when run as root).
``tempdir`` (only without ``mountns``)
    a fresh temporary directory as working directory, HOME and TMPDIR, removed afterwards.
``socket-preamble`` (only without ``netns``)
    the bootstrap replaces the ``socket`` module's connect/bind/getaddrinfo functions: a
    best-effort guard that code using ``_socket`` directly can bypass.

After the run every process still carrying the run's random marker on its command line is
killed and waited for (the PID namespace dies asynchronously; without namespaces this also finds
a forked child that left the process group, though not one that exec'd another program).

stdout and stderr go to files outside the sandbox; when long, their middle is cut on reading.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

NOBODY = 65534
NS_WORKDIR = "/tmp/sandbox"

# Trusted code run with ``python -I -c``: argv[1] is the JSON config, the program is on stdin.
_BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
source = sys.stdin.buffer.read()
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["block_socket"]:
    import socket
    def _no_network(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
        setattr(socket.socket, _name, _no_network)
    socket.create_connection = _no_network
    socket.getaddrinfo = _no_network
    socket.create_server = _no_network
del cfg
sys.argv = ["main.py"]
code = compile(source, "main.py", "exec")
del source
exec(code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""

# What the minimal root shows of the host, read-only: system directories (or their symlinks, as
# on merged-/usr systems), and single files the dynamic linker wants.
_ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ROOT_FILES = ("/etc/ld.so.cache",)
_DEVICES = ("null", "zero", "full", "random", "urandom")
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# Run by /bin/sh as (namespace) root, PID 1 of the new PID namespace, inside the new mount
# namespace: builds the minimal root on a fresh tmpfs at $3, mounts a /proc that shows this PID
# namespace only, pivots into the new root, detaches the host's tree, makes / read-only and
# execs the command. $1: uid to own the working directory or "-", $2: tmpfs size in MiB, $3: an
# empty directory to build the root on, $4: ':'-separated extra directories to show read-only
# (the interpreter's installation), then the command.
_MOUNT_SCRIPT = r"""
set -e
R=$3
CALLER_PATH=$PATH
PATH=/usr/local/sbin:/usr/sbin:/sbin:$PATH
mount -t tmpfs -o "size=${2}m,mode=755" llmopt-sandbox-root "$R"
robind() {  # robind SRC: show SRC read-only at the same path under $R
  if [ -d "$1" ]; then mkdir -p "$R$1"; else mkdir -p "$R$(dirname "$1")"; : > "$R$1"; fi
  mount --bind "$1" "$R$1"
  mount -o remount,bind,ro,nosuid "$R$1"
}
for d in """ + " ".join(_ROOT_DIRS) + r"""; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$R$d"; elif [ -d "$d" ]; then robind "$d"; fi
done
for f in """ + " ".join(_ROOT_FILES) + r"""; do
  if [ -f "$f" ]; then robind "$f"; fi
done
IFS=:
for d in $4; do
  if [ -n "$d" ]; then robind "$d"; fi
done
unset IFS
mkdir -p "$R/dev" "$R/proc" "$R/etc" "$R/.oldroot"
for n in """ + " ".join(_DEVICES) + r"""; do robind "/dev/$n"; done
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t proc -o ro,nosuid,nodev,noexec proc "$R/proc"
for d in """ + " ".join(_WRITABLE_DIRS) + r"""; do
  mkdir -p "$R$d"
  mount -t tmpfs -o "size=${2}m,mode=1777,nosuid,nodev" llmopt-sandbox "$R$d"
done
mkdir -m 700 "$R""" + NS_WORKDIR + r""""
if [ "$1" != "-" ]; then chown "$1:$1" "$R""" + NS_WORKDIR + r""""; fi
cd "$R"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot
mount -o remount,ro,nosuid,nodev /
cd """ + NS_WORKDIR + r"""
PATH=$CALLER_PATH
shift 4
exec "$@"
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    disk_mb: int = 64  # size of each tmpfs in the mount namespace
    max_open_files: int = 64
    output_chars: int = 16_384


@dataclass
class SandboxResult:
    """What happened to one program.

    ``status`` is ``"ok"`` (exit 0), ``"error"`` (non-zero exit or killed by a signal other than
    our timeout) or ``"timeout"`` (killed after ``timeout_s`` of wall time). ``marker`` is a
    random token on the sandbox's command line, so tests can look for surviving processes.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: tuple[str, ...]
    marker: str = field(repr=False, default="")

    @property
    def passed(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _Plan:
    """How runs are launched on this machine; probed once per process."""

    namespaces: tuple[str, ...]  # unshare + sh words, () when unavailable
    drop: tuple[str, ...]  # setpriv words, () when not dropping privileges
    python: str
    layers: tuple[str, ...]
    shown: tuple[str, ...] = ()  # the interpreter's directories, shown read-only in the root

    def command(self, limits: SandboxLimits, root: str, tail: list[str]) -> list[str]:
        """The argv of one run; ``root`` is an empty directory the namespace builds its root on."""
        if not self.namespaces:
            return [*self.drop, *tail]
        owner = str(NOBODY) if self.drop else "-"
        return [*self.namespaces, owner, str(limits.disk_mb), root, ":".join(self.shown),
                *self.drop, *tail]


def _probe(cmd: list[str], stdin: bytes = b"") -> bool:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        log.info("sandbox probe failed %s: %s", cmd[:6], done.stderr.decode(errors="replace")[-300:])
    return done.returncode == 0


def _probe_plan(plan: _Plan, tail: list[str]) -> bool:
    root = tempfile.mkdtemp(prefix="llmopt-sandbox-probe-")
    try:
        return _probe(plan.command(SandboxLimits(), root, tail))
    finally:
        os.rmdir(root)


_PROBE_IMPORTS = "import collections, functools, hashlib, itertools, json, math, re, string, typing"


def _interpreters() -> list[tuple[str, str]]:
    """(executable, installation prefix) of the candidate interpreters: this one's base
    installation (never a virtualenv, whose site-packages live in a checkout), ``python3`` on
    PATH, ``/usr/bin/python3``."""
    found: list[tuple[str, str]] = []
    ask = ("import os, sys; print(os.path.realpath(sys.executable)); "
           "print(os.path.realpath(sys.base_prefix))")
    for exe in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if exe is None or not os.path.exists(exe):
            continue
        try:
            exe, base = subprocess.run(
                [exe, "-I", "-c", ask],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.split("\n")[:2]
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
        if exe and (exe, base) not in found:
            found.append((exe, base))
    return found


@functools.lru_cache(maxsize=1)
def _plan() -> _Plan:
    layers = ["process-group", "rlimits"]
    namespaces: tuple[str, ...] = ()
    unshare, sh = shutil.which("unshare"), shutil.which("sh") or "/bin/sh"
    if unshare is not None:
        flags = ("--mount", "--propagation", "private", "--net", "--pid", "--fork", "--kill-child")
        if os.geteuid() != 0:
            flags = ("--map-root-user", *flags)
        cand = (unshare, *flags, "--", sh, "-c", _MOUNT_SCRIPT, "sh")
        # probe with sh, not sys.executable: the interpreter is chosen below
        if _probe_plan(_Plan(cand, (), "", ()), [sh, "-c", "true"]):
            namespaces = cand
            layers += ["netns", "pidns", "mountns", "minroot"]
        else:
            log.warning("unshare is present but the sandbox root cannot be built here")
    drop: tuple[str, ...] = ()
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is not None:
        drop = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "--no-new-privs", "--")
    python, shown = sys.executable, ()
    if namespaces or drop:
        for exe, base in _interpreters():
            shown_dirs = (base,) if exe.startswith(base + os.sep) else (base, os.path.dirname(exe))
            code = f"{_PROBE_IMPORTS}\nimport sys\nassert sys.base_prefix == {base!r}, sys.base_prefix"
            trial = _Plan(namespaces, drop, exe, (), shown_dirs)
            if _probe_plan(trial, [exe, "-I", "-c", code]):
                python, shown = exe, shown_dirs
                break
        else:
            if drop:
                log.warning("no Python interpreter runs as uid %d: the sandbox keeps root", NOBODY)
                drop = ()
            if namespaces:
                log.warning("no Python interpreter runs in the sandbox root: no namespaces")
                namespaces = ()
                layers = layers[:2]
    if drop:
        layers.append(f"uid:{NOBODY}")
    if not namespaces:
        layers += ["tempdir", "socket-preamble"]
        log.warning("unshare is not usable here: the sandbox has no network, PID or mount "
                    "namespace and blocks sockets in Python only")
    return _Plan(namespaces, drop, python, tuple(layers), shown)


def isolation_layers() -> tuple[str, ...]:
    """The containment layers a run gets on this machine (see the module docstring)."""
    return _plan().layers


def sandbox_info() -> dict[str, object]:
    """Layers and interpreter of the sandbox on this machine, for run records."""
    plan = _plan()
    return {"layers": list(plan.layers), "python": plan.python}


def _rmtree(path: str) -> None:
    def fix_and_retry(func, p, _exc):  # a program may leave read-only files and dirs
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix_and_retry)
    else:
        shutil.rmtree(path, onerror=fix_and_retry)


def _read_output(path: str, limit: int) -> str:
    """The file's text, or its first and last ``limit // 2`` characters if it is longer."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if size <= limit:
            return fh.read().decode("utf-8", errors="replace")
        head = fh.read(limit // 2)
        fh.seek(size - limit // 2)
        tail = fh.read()
    return (head.decode("utf-8", errors="replace") + "\n[... truncated ...]\n"
            + tail.decode("utf-8", errors="replace"))


def _marked_processes(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker`` (zombies have none)."""
    needle = marker.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if needle in fh.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


def _kill_marked(marker: str, wait_s: float = 5.0) -> None:
    """SIGKILL every process of this run still alive and wait until none is left. The PID
    namespace dies asynchronously after its first process, and without namespaces a child
    that left the process group is found only this way."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = _marked_processes(marker)
        if not pids:
            return
        if time.monotonic() > deadline:
            log.warning("sandbox processes %s still alive after %.1fs", pids, wait_s)
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as ``__main__`` in the sandbox and report how it ended.

    Nothing the program writes survives and any process it started is killed before this
    returns.
    """
    limits = limits or SandboxLimits()
    plan = _plan()
    marker = "llmopt-sandbox-" + secrets.token_hex(8)
    cfg = {
        "marker": marker,
        "block_socket": "netns" not in plan.layers,
        "rlimits": {
            "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
            "RLIMIT_CPU": int(limits.timeout_s) + 1,
            "RLIMIT_FSIZE": limits.max_file_mb * 1024 * 1024,
            "RLIMIT_NOFILE": limits.max_open_files,
            "RLIMIT_NPROC": limits.max_processes,
            "RLIMIT_CORE": 0,
        },
    }
    ctrldir = tempfile.mkdtemp(prefix="llmopt-sandbox-io-")
    hostdir = None
    try:
        if plan.namespaces:
            workdir, cwd = NS_WORKDIR, "/"
        else:
            hostdir = tempfile.mkdtemp(prefix="llmopt-sandbox-")
            if plan.drop:
                os.chown(hostdir, NOBODY, NOBODY)
            workdir = cwd = hostdir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8"}
        root = os.path.join(ctrldir, "root")
        os.mkdir(root)
        cmd = plan.command(limits, root, [plan.python, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)])
        out_path = os.path.join(ctrldir, "stdout")
        err_path = os.path.join(ctrldir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(code.encode("utf-8"))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                remaining = limits.timeout_s - (time.monotonic() - start)
                proc.wait(timeout=max(remaining, 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill whatever is left in the group, finished or not (background children).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                _kill_marked(marker)
        duration = time.monotonic() - start
        rc = proc.returncode
        status = "timeout" if timed_out else ("ok" if rc == 0 else "error")
        return SandboxResult(
            status=status,
            returncode=None if timed_out else rc,
            stdout=_read_output(out_path, limits.output_chars),
            stderr=_read_output(err_path, limits.output_chars),
            duration_s=duration,
            isolation=plan.layers,
            marker=marker,
        )
    finally:
        _rmtree(ctrldir)
        if hostdir is not None:
            _rmtree(hostdir)
