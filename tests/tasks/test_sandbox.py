"""The sandbox contains hostile completions. Each hostile program is first shown to do harm (or
to be able to) outside the sandbox, so no test can pass because the program simply failed."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from llmopt.tasks.sandbox import SandboxLimits, isolation_layers, run_python


def _processes_with(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _unsandboxed(code: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)


def test_machine_provides_the_full_isolation_this_suite_relies_on():
    layers = isolation_layers()
    for layer in ("process-group", "rlimits", "netns", "pidns", "mountns", "minroot"):
        assert layer in layers, f"sandbox lacks {layer}: {layers}"
    if os.geteuid() == 0:
        assert "uid:65534" in layers


def test_ordinary_program_runs_and_its_output_is_captured():
    r = run_python("import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)")
    assert r.status == "ok" and r.passed
    assert r.stdout == "45\n" and r.stderr == "warn\n"
    r = run_python("raise SystemExit(3)")
    assert r.status == "error" and r.returncode == 3 and not r.passed


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout" and not r.passed
    assert 1.0 <= r.duration_s < 3.0
    assert time.monotonic() - start < 4.0
    assert _processes_with(r.marker) == []


def test_fork_bomb_is_capped_and_leaves_no_process_behind():
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.write(1, b'+\\n')\n"
        "    except OSError:\n"
        "        time.sleep(0.005)\n"
    )
    limits = SandboxLimits(timeout_s=2.0, max_processes=16)
    r = run_python(bomb, limits)
    assert r.status == "timeout"
    forks = r.stdout.count("+")
    assert forks >= 1, "the bomb never forked: the test would be vacuous"
    assert forks < limits.max_processes, f"{forks} forks got past RLIMIT_NPROC"
    assert _processes_with(r.marker) == []


def test_child_that_escapes_the_process_group_still_dies_with_the_run():
    escape = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "else:\n"
        "    time.sleep(0.2)\n"
        "    print('parent exits')\n"
    )
    r = run_python(escape)
    assert r.status == "ok" and "parent exits" in r.stdout
    time.sleep(0.2)
    assert _processes_with(r.marker) == []


_DELETE = (
    "import os, shutil\n"
    "print('sees it:', os.path.exists({path!r}))\n"
    "os.remove({path!r})\n"
)


def test_deleting_a_sentinel_in_tmp_path_fails(tmp_path):
    victim, control = tmp_path / "sentinel.txt", tmp_path / "control.txt"
    victim.write_text("keep me")
    control.write_text("delete me")
    # the same code does delete the file when it is not sandboxed
    assert _unsandboxed(_DELETE.format(path=str(control))).returncode == 0
    assert not control.exists()
    r = run_python(_DELETE.format(path=str(victim)) + f"shutil.rmtree({str(tmp_path)!r})\n")
    assert r.status == "error", r.stdout
    assert victim.read_text() == "keep me"


@pytest.fixture
def world_writable_dir():
    # A directory anyone may write to, outside /tmp, so the sandbox sees it: only the sandbox
    # itself (a read-only view of the host) can stop the deletion, not file permissions. Not in the
    # checkout: a clone may live under /tmp (covered by the sandbox's tmpfs) or under a 0700 home.
    base = "/var/cache" if os.access("/var/cache", os.W_OK) else os.path.dirname(os.path.abspath(__file__))
    d = os.path.join(base, f".llmopt-sandbox-victim-{os.getpid()}")
    os.makedirs(d)
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        for name in os.listdir(d):
            os.remove(os.path.join(d, name))
        os.rmdir(d)


def test_world_writable_host_file_is_neither_visible_nor_deletable(world_writable_dir):
    victim = os.path.join(world_writable_dir, "sentinel.txt")
    control = os.path.join(world_writable_dir, "control.txt")
    for path in (victim, control):
        with open(path, "w") as fh:
            fh.write("x")
        os.chmod(path, 0o666)
    assert _unsandboxed(_DELETE.format(path=control)).returncode == 0
    assert not os.path.exists(control)
    r = run_python(_DELETE.format(path=victim) + f"open({victim!r}, 'w').write('overwritten')\n")
    assert "sees it: False" in r.stdout, r.stdout
    assert r.status == "error" and "FileNotFoundError" in r.stderr
    with open(victim) as fh:
        assert fh.read() == "x"


_READ = (
    "import sys\n"
    "for path in sys.argv[1:] or {paths!r}:\n"
    "    try:\n"
    "        with open(path, 'rb') as fh:\n"
    "            print('read', path, len(fh.read()))\n"
    "    except OSError as e:\n"
    "        print('refused', path, type(e).__name__)\n"
)


def test_host_files_and_the_checkout_cannot_be_read():
    checkout_file = os.path.abspath(__file__)
    paths = ["/etc/passwd", "/etc/hostname", checkout_file,
             os.path.join(os.path.dirname(checkout_file), "conftest.py")]
    paths = [p for p in paths if os.path.exists(p)]
    control = _unsandboxed(_READ.format(paths=paths))
    assert control.stdout.count("read ") == len(paths), control.stdout  # readable on the host
    r = run_python(_READ.format(paths=paths))
    assert r.status == "ok", r.stderr
    assert r.stdout.count("refused") == len(paths) and "read " not in r.stdout, r.stdout
    assert "FileNotFoundError" in r.stdout


_PROCS = (
    "import os\n"
    "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
    "print('pids', pids, 'me', os.getpid())\n"
    "found = []\n"
    "needle = {reversed_secret!r}[::-1].encode()  # not spelled out on our own command line\n"
    "for pid in sorted(set(pids + [{host_pid}])):\n"
    "    try:\n"
    "        with open(f'/proc/{{pid}}/cmdline', 'rb') as fh:\n"
    "            if needle in fh.read():\n"
    "                found.append(pid)\n"
    "    except OSError:\n"
    "        pass\n"
    "print('secret found in', found)\n"
)


def test_program_sees_only_its_own_processes_not_host_command_lines():
    secret = f"--api-key=sk-sandbox-secret-{os.getpid()}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret])
    try:
        code = _PROCS.format(host_pid=host.pid, reversed_secret=secret[::-1])
        control = _unsandboxed(code)
        assert f"secret found in [{host.pid}]" in control.stdout, control.stdout
        r = run_python(code)
        assert r.status == "ok", r.stderr
        assert "pids [1] me 1" in r.stdout, r.stdout
        assert "secret found in []" in r.stdout, r.stdout
    finally:
        host.kill()
        host.wait()


_MOUNTS = (
    "import os\n"
    "print(sorted(os.listdir('/')))\n"
    "for line in open('/proc/self/mounts'):\n"
    "    _dev, where, _fs, opts = line.split()[:4]\n"
    "    print(where, opts.split(',')[0])\n"
)


def test_root_is_minimal_and_read_only_outside_the_scratch_dirs():
    r = run_python(_MOUNTS)
    assert r.status == "ok", r.stderr
    top, *mounts = r.stdout.splitlines()
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc",
               "tmp", "var", "root", "home", "opt"}  # root/home/opt only as the path to Python
    assert set(eval(top)) <= allowed, top
    writable = {where for where, mode in (m.split() for m in mounts) if mode == "rw"}
    assert writable == {"/tmp", "/var/tmp", "/dev/shm"}, mounts
    assert any(m.split()[0] == "/" for m in mounts)


def test_nothing_the_program_writes_is_left_behind():
    before = set(os.listdir("/tmp"))
    name = f"llmopt-sandbox-leftover-{os.getpid()}"
    writer = (
        "import os, tempfile\n"
        f"for d in ('.', os.environ['HOME'], tempfile.gettempdir(), '/tmp', '/var/tmp', '/dev/shm'):\n"
        f"    with open(os.path.join(d, {name!r}), 'w') as fh:\n"
        "        fh.write('x')\n"
        "print(os.getcwd())\n"
        "print(sorted(os.listdir('.')))\n"
    )
    r = run_python(writer)
    assert r.status == "ok", r.stderr
    cwd, listing = r.stdout.splitlines()
    assert name in listing  # the writes happened
    assert not os.path.exists(cwd) or name not in os.listdir(cwd)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(os.path.join(d, name)), f"left behind in {d}"
    assert {p for p in os.listdir("/tmp") if p.startswith("llmopt-sandbox")} <= {
        p for p in before if p.startswith("llmopt-sandbox")}


def test_network_connection_to_localhost_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept_loop(stop):
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=accept_loop, args=(stop,), daemon=True)
    thread.start()
    client = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'exfiltrate')\n"
        "print('connected')\n"
    )
    try:
        control = _unsandboxed(client)
        assert control.returncode == 0 and "connected" in control.stdout
        deadline = time.monotonic() + 2
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 1, "the control connection never arrived"
        r = run_python(client)
        time.sleep(0.3)
        assert r.status == "error" and "connected" not in r.stdout
        assert "unreachable" in r.stderr.lower() or "PermissionError" in r.stderr
        assert len(accepted) == 1, "the sandboxed program reached the server"
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        server.close()


def test_memory_and_file_size_limits_hold():
    r = run_python("x = bytearray(4 * 1024**3)\n", SandboxLimits(memory_mb=512))
    assert r.status == "error" and "MemoryError" in r.stderr
    r = run_python("open('big', 'wb').write(b'x' * (32 * 1024**2))\n", SandboxLimits(max_file_mb=8))
    assert r.status == "error" and "File too large" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only when run as root")
def test_program_does_not_run_as_root():
    r = run_python("import os\nprint(os.getuid(), os.geteuid(), os.getgroups())")
    assert r.stdout.split()[:2] == ["65534", "65534"]
