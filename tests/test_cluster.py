"""The cluster: HAProxy in front of several tcp_upper servers, health checks, deploy files.

Tests that run HAProxy are marked ``cluster`` and skipped where it is not installed; the
rendering and deploy-file tests run everywhere. Everything is on loopback with free ports;
waits poll a condition until a deadline, and every process is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from conftest import connect, wait_until

from tcp_upper import cluster as cl

ROOT = Path(__file__).resolve().parent.parent
HAPROXY = cl.find_haproxy()
FAST = cl.HealthCheck(inter_ms=200, fall=2, rise=2, timeout_ms=200)

needs_haproxy = [
    pytest.mark.cluster,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install haproxy)"),
    pytest.mark.timeout(30),
]


# -- helpers ---------------------------------------------------------------------------------


def open_sockets(pid: int) -> int:
    """Sockets process *pid* holds open: its listening socket plus one per connection.

    Read from /proc/PID/fd, so it is the server's own view, exact even while other
    processes open and close connections (unlike a walk over /proc/net/tcp).
    """
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed while we looked
            count += os.readlink(fd_dir / fd).startswith("socket:")
    return count


def recv_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Bytes up to and including the first newline (or until EOF), within *timeout*."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def open_clients(port: int, count: int, tag: str) -> list[socket.socket]:
    """*count* clients through the front, each already answered correctly once (held open)."""
    clients = []
    try:
        for _ in range(count):
            clients.append(connect(port))
        for i, sock in enumerate(clients):
            sock.sendall(f"{tag} ñandú {i}\n".encode())
        for i, sock in enumerate(clients):
            assert recv_line(sock) == f"{tag.upper()} ÑANDÚ {i}\n".encode()
    except BaseException:
        close_all(clients)
        raise
    return clients


def close_all(clients: list[socket.socket]) -> None:
    for sock in clients:
        sock.close()


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., cl.Cluster]]:
    """Start clusters on free loopback ports with fast health checks; stop them by PID after."""
    with clusters() as make:
        yield make


@contextlib.contextmanager
def clusters() -> Iterator[Callable[..., cl.Cluster]]:
    """What :func:`make_cluster` does, for other test modules' fixtures."""
    started: list[cl.Cluster] = []

    def make(**kwargs: object) -> cl.Cluster:
        options: dict = {"instances": 3, "base_port": 0, "check": FAST, "log_level": "INFO"}
        options.update(kwargs)
        cluster = cl.Cluster("127.0.0.1", 0, haproxy=HAPROXY, **options)
        started.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in started:
        pids = [cluster.haproxy_pid] + [i.pid for i in cluster.instances]
        cluster.stop()
        for pid in pids:  # stop() waited for each, killing it if need be: none is left
            if pid is not None:
                assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
        assert not cluster.killed, f"had to be killed after SIGTERM: {cluster.killed}"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def status(cluster: cl.Cluster, name: str) -> str:
    return cluster.server_states()[name]["status"]


# -- rendering and deploy files (no HAProxy needed) -----------------------------------------


def test_deploy_config_is_the_default_rendering() -> None:
    text = (ROOT / "deploy" / "haproxy.cfg").read_text(encoding="utf-8")
    assert text == cl.render_haproxy_config(), (
        "deploy/haproxy.cfg drifted; regenerate it: "
        "python -m tcp_upper.cluster --print-config > deploy/haproxy.cfg"
    )


def test_render_has_the_contract() -> None:
    text = cl.render_haproxy_config(
        "0.0.0.0", 6000, [("127.0.0.1", 6001), ("10.0.0.2", 5000), ("::1", 7000)],
        check=cl.HealthCheck(inter_ms=200, fall=2, rise=4, timeout_ms=300), maxconn=123,
        stats_socket="/run/x.sock",
    )
    lines = [line.strip() for line in text.splitlines()]
    for expected in [
        "mode tcp", "balance leastconn", "option tcp-check", "tcp-check expect string PING",
        "bind 0.0.0.0:6000", "maxconn 123",
        "default-server inter 200ms fall 2 rise 4 send-proxy-v2 check-send-proxy",
        "timeout check 300ms",
        "server s1 127.0.0.1:6001 check", "server s2 10.0.0.2:5000 check",
        "server s3 [::1]:7000 check", "stats socket /run/x.sock mode 600 level admin",
        "timeout connect 2s", "timeout client 1h", "timeout server 1h",
    ]:
        assert expected in lines, expected
    send = next(line for line in lines if line.startswith("tcp-check send "))
    assert send.startswith('tcp-check send "ping\\n')


def test_default_checks_notice_a_hung_server_within_3_seconds() -> None:
    check = cl.HealthCheck()
    assert check.fall * (check.inter_ms + check.timeout_ms) <= 3000
    lines = cl.render_haproxy_config().splitlines()
    assert "    timeout check 1s" in lines
    assert "    default-server inter 500ms fall 2 rise 2 send-proxy-v2 check-send-proxy" in lines


def test_render_tls_on_an_inherited_socket() -> None:
    lines = cl.render_haproxy_config(tls_cert="/etc/tcp-upper/front.pem", front_fd=7).splitlines()
    assert "    bind fd@7 ssl crt /etc/tcp-upper/front.pem" in lines


def test_render_timeouts_follow_the_servers_idle_timeout() -> None:
    lines = cl.render_haproxy_config(idle_timeout=30).splitlines()
    assert "    timeout client 40s" in lines
    assert "    timeout server 40s" in lines
    assert "    timeout client 2m" in cl.render_haproxy_config(idle_timeout=110).splitlines()
    # The servers accept idle timeouts far beyond what HAProxy can count: cap them.
    assert "    timeout client 2147483s" in cl.render_haproxy_config(idle_timeout=1e7).splitlines()


def test_render_needs_a_backend() -> None:
    with pytest.raises(ValueError):
        cl.render_haproxy_config(backends=[])


def test_print_config_matches_the_renderer(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tcp_upper.cluster", "--print-config", "--port", "6000",
         "--instances", "2", "--backend", "10.0.0.2:5000", "--idle-timeout", "30"],
        capture_output=True, text=True, timeout=20, cwd=tmp_path, env=_clean_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == cl.render_haproxy_config(
        "localhost", 6000, [("127.0.0.1", 6001), ("127.0.0.1", 6002), ("10.0.0.2", 5000)],
        idle_timeout=30,
    )


def test_console_script_prints_the_same_config(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("tcp-upper-cluster")
    if not script.exists():
        pytest.skip("tcp-upper-cluster is not installed next to this Python (pip install -e .)")
    out = subprocess.run([str(script), "--print-config", "--tls-cert", "/x/front.pem"],
                         capture_output=True, text=True, timeout=20, cwd=tmp_path,
                         env=_clean_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout == cl.render_haproxy_config(tls_cert="/x/front.pem")


def test_parse_backend() -> None:
    assert cl.parse_backend("10.0.0.2:5000") == ("10.0.0.2", 5000)
    assert cl.parse_backend("[::1]:5000") == ("::1", 5000)
    for bad in ("10.0.0.2", "host:0", "host:abc", ":5000"):
        with pytest.raises(ValueError):
            cl.parse_backend(bad)


def test_service_unit_has_what_operations_rely_on() -> None:
    text = (ROOT / "deploy" / "tcp-upper.service").read_text(encoding="utf-8")
    keys = {
        line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
        for line in text.splitlines()
        if "=" in line and not line.lstrip().startswith(("#", ";"))
    }
    assert keys["Type"] in ("simple", "exec")
    assert "tcp-upper-server" in keys["ExecStart"] or "tcp_upper.server" in keys["ExecStart"]
    assert keys["Restart"] == "on-failure"
    assert keys["KillSignal"] == "SIGTERM"
    assert "EnvironmentFile" in keys
    assert "TimeoutStopSec" in keys
    assert keys.get("User") and keys["User"] != "root"
    assert keys.get("NoNewPrivileges") == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_service_unit_verifies(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at a stand-in with the same arguments.
    text = (ROOT / "deploy" / "tcp-upper.service").read_text(encoding="utf-8")
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert exec_start is not None
    unit = tmp_path / "tcp-upper.service"
    unit.write_text(text.replace(exec_start.group(1), "/bin/true"), encoding="utf-8")
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=20,
    )
    problems = [
        line for line in out.stderr.splitlines()
        if "tcp-upper.service" in line and "/bin/true" not in line
    ]
    assert out.returncode == 0 and not problems, out.stderr


# -- HAProxy in front of real servers --------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """The environment without TCP_UPPER_* settings, so only the test's flags count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TCP_UPPER_")}


def cluster_test(function: Callable[..., None]) -> Callable[..., None]:
    for mark in reversed(needs_haproxy):
        function = mark(function)
    return function


@cluster_test
def test_deploy_config_is_valid_haproxy() -> None:
    out = subprocess.run(
        [HAPROXY, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@cluster_test
def test_300_clients_are_answered_and_spread_over_all_instances(make_cluster) -> None:
    cluster = make_cluster()
    ports = {instance.port for instance in cluster.instances}
    assert len(ports) == 3 and 0 not in ports
    pids = [instance.pid for instance in cluster.instances]
    idle = [open_sockets(pid) for pid in pids]
    before = {name: int(s["stot"]) for name, s in cluster.server_states().items()}
    clients = open_clients(cluster.front_port, 300, "hola")
    try:
        # Counted by each server process while all 300 are open. A health check holds at most
        # one short connection per instance, so it cannot bring any count near 60.
        served = [open_sockets(pid) - base for pid, base in zip(pids, idle)]
        assert abs(sum(served) - 300) <= 3, served
        assert min(served) >= 60, served
        # HAProxy's session counters (which never include checks) agree.
        after = {name: int(s["stot"]) for name, s in cluster.server_states().items()}
        sessions = {name: after[name] - before[name] for name in after}
        assert sum(sessions.values()) == 300 and min(sessions.values()) >= 60, sessions
    finally:
        close_all(clients)


@cluster_test
def test_desconexion_through_the_proxy_closes_that_client_only(make_cluster) -> None:
    # At WARNING the servers do not log that they listen: readiness must not depend on it.
    cluster = make_cluster(log_level="WARNING")
    first, second = connect(cluster.front_port), connect(cluster.front_port)
    with first, second:
        for sock in (first, second):
            sock.sendall(b"hola\n")
            assert recv_line(sock) == b"HOLA\n"
        first.sendall(b"adios\nDESCONEXION\n")
        assert recv_line(first) == b"ADIOS\n"
        assert recv_line(first) == b""  # an orderly end of stream: a reset would raise
        second.sendall(b"sigo aqu\xc3\xad\n")
        assert recv_line(second) == "SIGO AQUÍ\n".encode()
        with connect(cluster.front_port) as third:
            third.sendall(b"nuevo\n")
            assert recv_line(third) == b"NUEVO\n"
    assert all(i.child.process.poll() is None for i in cluster.instances)


@cluster_test
def test_a_dead_instance_is_taken_out_and_rejoins_after_restart(make_cluster, caplog) -> None:
    cluster = make_cluster()
    victim = cluster.instances[1]
    others = [i.pid for i in cluster.instances if i is not victim]
    wait_until(lambda: all(s["status"] == "UP" for s in cluster.server_states().values()),
               10, "every server UP")
    os.kill(victim.pid, signal.SIGKILL)
    victim.child.process.wait(5)
    cluster.supervise()
    assert any(victim.name in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records), "the death is logged"

    # Before the checks notice, a refused connect is retried on another server.
    close_all(open_clients(cluster.front_port, 30, "pronto"))
    wait_until(lambda: status(cluster, victim.name).startswith("DOWN"), 10,
               f"{victim.name} marked DOWN by the health check")
    held = open_clients(cluster.front_port, 30, "sin ella")
    try:
        assert sum(open_sockets(pid) - 1 for pid in others) >= 30
        cluster.restart_instance(victim.name)
        wait_until(lambda: status(cluster, victim.name) == "UP", 10,
                   f"{victim.name} UP again")
        # leastconn: the 30 held clients sit on the other two, so the rejoined one gets the
        # next ones first.
        idle = open_sockets(victim.pid)
        fresh = open_clients(cluster.front_port, 30, "de vuelta")
        try:
            assert open_sockets(victim.pid) - idle >= 10
        finally:
            close_all(fresh)
    finally:
        close_all(held)


@cluster_test
def test_restart_option_brings_a_dead_instance_back(make_cluster) -> None:
    cluster = make_cluster(instances=2, restart=True, log_level="WARNING")
    victim = cluster.instances[0]
    old_pid = victim.pid
    os.kill(old_pid, signal.SIGKILL)
    victim.child.process.wait(5)

    def restarted() -> bool:
        cluster.supervise()
        return victim.pid != old_pid and victim.ready

    wait_until(restarted, 10, "the instance restarted by the supervisor")
    wait_until(lambda: status(cluster, victim.name) == "UP", 10, "the new instance UP")


@cluster_test
def test_a_busy_front_port_fails_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        front = busy.getsockname()[1]
        cluster = cl.Cluster("127.0.0.1", front, haproxy=HAPROXY, instances=2, check=FAST)
        with pytest.raises(cl.ClusterError, match=rf"puerto {front} está ocupado.*--port"):
            cluster.start()
    assert all(i.child is None for i in cluster.instances)
    assert cluster.run_dir is None and cluster.haproxy_pid is None


@cluster_test
def test_start_failure_stops_what_was_started(tmp_path: Path) -> None:
    # A certificate HAProxy cannot load: the instances are up by then, and are stopped again.
    bad = tmp_path / "front.pem"
    bad.write_text("no es un certificado\n", encoding="utf-8")
    cluster = cl.Cluster("127.0.0.1", 0, haproxy=HAPROXY, instances=2, check=FAST,
                         tls_cert=str(bad))
    with pytest.raises(cl.ClusterError, match=r"HAProxy no arrancó: "):
        cluster.start()
    assert all(i.child.process.poll() is not None for i in cluster.instances)
    assert cluster.run_dir is None


def _read_lines(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@cluster_test
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm-to-pid", "ctrl-c-to-group"])
def test_command_line_serves_and_stops_on_a_signal(tmp_path: Path, ctrl_c: bool) -> None:
    """SIGTERM reaches the cluster alone; Ctrl-C in a terminal reaches every child as well."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tcp_upper.cluster", "--host", "127.0.0.1", "--port", "0",
         "--base-port", "0", "--instances", "2", "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=tmp_path, env=_clean_env(), start_new_session=True,
    )
    lines: list[str] = []
    printed: list[str] = []
    readers = [
        threading.Thread(target=_read_lines, args=(stream, sink), daemon=True)
        for stream, sink in ((process.stderr, lines), (process.stdout, printed))
    ]
    for reader in readers:
        reader.start()
    children: list[int] = []
    try:
        wait_until(lambda: printed or process.poll() is not None, 15,
                   "the 'connect here' line on stdout")
        assert process.poll() is None, "".join(lines)
        found = re.search(r"Cluster escuchando en 127\.0\.0\.1:(\d+)", printed[0])
        assert found, printed
        front = int(found.group(1))
        assert f"--port {front}" in printed[0], printed
        children = [int(pid) for pid in Path(
            f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        assert len(children) == 3  # two servers and HAProxy
        with connect(front) as sock:
            sock.sendall(b"hola servidor\n")
            assert recv_line(sock) == b"HOLA SERVIDOR\n"
        if ctrl_c:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        for pid in children:  # a leftover child is a failure, and is not left behind
            if Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"child {pid} still running after the cluster exited")
    for reader in readers:
        reader.join(5)
    assert len(printed) == 1, printed
    # The cluster's own lines (the children's are relayed with a "name | " prefix): no
    # traceback, and no instance reported dead because the signal reached it too.
    own = [line for line in lines if not re.match(r"(s\d+|haproxy) \| ", line)]
    assert not any("Traceback" in line or "terminó (" in line for line in own), "".join(lines)
    assert not [line for line in own if "no terminó tras SIGTERM" in line], "".join(lines)


def test_command_line_without_haproxy_says_so(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tcp_upper.cluster", "--port", "0",
         "--haproxy", str(tmp_path / "no-haproxy")],
        capture_output=True, text=True, timeout=20, cwd=tmp_path, env=_clean_env(),
    )
    assert out.returncode == 1
    assert "HAProxy" in out.stderr and "--haproxy" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ([], {"TCP_UPPER_PORT": "abc"}, "TCP_UPPER_PORT"),
        (["--port", "6000", "--base-port", "5999"], {}, "--base-port"),
        (["--instances", "0"], {}, "--backend"),
        (["--backend", "nohost"], {}, "--backend"),
        (["--tls-cert", "no-such.pem"], {}, "--tls-cert"),
    ],
)
def test_command_line_bad_settings_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tcp_upper.cluster", *args],
        capture_output=True, text=True, timeout=20, cwd=tmp_path, env={**_clean_env(), **env},
    )
    assert out.returncode == 2
    assert named in out.stderr and "Traceback" not in out.stderr
