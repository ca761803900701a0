"""Several tcp_upper servers behind HAProxy: the shape that runs past one process or machine.

``python -m tcp_upper.cluster`` starts N servers on loopback back-end ports and HAProxy in front
of them on the configured host and port, waits until everything accepts connections, then
supervises: an instance that dies is logged (and restarted with ``--restart``), HAProxy dying
stops the whole cluster. SIGINT/SIGTERM stop every child by PID, HAProxy first.

The HAProxy configuration has one source of truth, :func:`render_haproxy_config`;
``deploy/haproxy.cfg`` is its rendering with the defaults, and a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from . import __version__, config
from .errors import SettingsError, TcpUpperError
from .system import format_address

log = logging.getLogger(__name__)
#: Children's own log lines, relayed unchanged (they already carry a timestamp and level).
relay_log = logging.getLogger(__name__ + ".relay")

DEFAULT_INSTANCES = 3
#: Where the local instances listen: only HAProxy needs to reach them.
BACKEND_HOST = "127.0.0.1"
#: HAProxy's connection cap (process and front end). A proxied client costs HAProxy two
#: descriptors; 4096 clients fit a usual 20k hard limit and cover benchmarks/compare.sh's 2000.
DEFAULT_MAXCONN = 4096
#: Proxy inactivity limit when the servers' idle timeout is off: people at a client may think
#: for minutes, so an hour; TCP keepalive on both sides notices dead peers well before.
NO_IDLE_TIMEOUT_SECONDS = 3600
#: Added to the servers' idle timeout, so the server (which logs why and closes in order)
#: acts before the proxy cuts the connection silently.
IDLE_TIMEOUT_MARGIN_SECONDS = 10
#: HAProxy rejects timeouts past 2**31 - 1 ms (about 24 days).
HAPROXY_MAX_TIMEOUT_SECONDS = 2_147_483
#: A live back end answers a connect in microseconds on loopback or a LAN; past this, retry.
CONNECT_TIMEOUT = "2s"
#: A half-closed connection (the server's FIN after DESCONEXION) waits this long, not an hour.
FIN_TIMEOUT = "30s"
#: Seconds an instance or HAProxy gets to accept connections before start-up fails.
START_TIMEOUT_SECONDS = 10.0
#: Seconds all children get, together, to exit after SIGTERM before they are killed.
STOP_TIMEOUT_SECONDS = 5.0
#: With --restart: first delay before restarting a dead instance, and the cap of its doubling.
RESTART_DELAY_SECONDS, RESTART_DELAY_MAX_SECONDS = 1.0, 30.0
#: An instance that lived this long before dying is restarted after the first delay again.
RESTART_RESET_SECONDS = 60.0
#: How often the supervisor looks at its children.
POLL_SECONDS = 0.2

FRONTEND_NAME = "tcp_upper"
BACKEND_NAME = "tcp_upper_servers"


class ClusterError(TcpUpperError):
    """The cluster cannot start or keep running; the message says what failed and what to do."""


@dataclass(frozen=True)
class HealthCheck:
    """How HAProxy decides that a back end is up: every *inter_ms*, a line and its reply.

    A server is marked down after *fall* failed checks in a row and up again after *rise*
    good ones. Tests use short intervals; the default keeps the checks cheap.
    """

    inter_ms: int = 2000
    fall: int = 3
    rise: int = 2


def default_backends(
    base_port: int = 5001, count: int = DEFAULT_INSTANCES
) -> list[tuple[str, int]]:
    """The local back ends of the cluster command: *count* ports from *base_port* on loopback."""
    return [(BACKEND_HOST, base_port + i) for i in range(count)]


def _duration(seconds: float) -> str:
    """A HAProxy time value, in the largest whole unit: ``3600`` -> ``1h``, ``40`` -> ``40s``."""
    whole = math.ceil(seconds)
    if whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole % 60 == 0:
        return f"{whole // 60}m"
    return f"{whole}s"


def _interval(milliseconds: int) -> str:
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def proxy_idle_timeout(idle_timeout: float | None) -> float:
    """Seconds HAProxy lets a connection stay silent, given the servers' idle timeout."""
    if idle_timeout is None:
        return NO_IDLE_TIMEOUT_SECONDS
    return min(idle_timeout + IDLE_TIMEOUT_MARGIN_SECONDS, HAPROXY_MAX_TIMEOUT_SECONDS)


def render_haproxy_config(
    front_host: str = config.Settings.host,
    front_port: int = config.Settings.port,
    backends: Sequence[tuple[str, int]] | None = None,
    *,
    idle_timeout: float | None = None,
    check: HealthCheck = HealthCheck(),  # frozen, so one shared default is safe
    maxconn: int = DEFAULT_MAXCONN,
    stats_socket: str | None = None,
) -> str:
    """The HAProxy configuration for tcp_upper servers at *backends* behind *front_host:port*.

    Called with no arguments it returns ``deploy/haproxy.cfg``. *idle_timeout* is the servers'
    (``None`` = off) and sets the proxy's own inactivity timeouts; *stats_socket* adds the
    admin socket the cluster command and the tests read server states from.
    """
    backends = default_backends() if backends is None else list(backends)
    if not backends:
        raise ValueError("at least one back end is needed")
    if idle_timeout is None:
        idle_comment = [
            "    # The servers' idle timeout is off (a person may think for minutes): cap silence",
            f"    # at {_duration(NO_IDLE_TIMEOUT_SECONDS)}; TCP keepalive notices dead peers "
            "long before.",
        ]
    else:
        idle_comment = [
            f"    # The servers close clients silent for {idle_timeout:g} s and log why; the proxy",
            f"    # waits {IDLE_TIMEOUT_MARGIN_SECONDS} s longer so that the server acts first.",
        ]
    idle = _duration(proxy_idle_timeout(idle_timeout))
    lines = [
        "# tcp_upper behind HAProxy, rendered by tcp_upper.cluster.render_haproxy_config().",
        "# deploy/haproxy.cfg is the rendering with the defaults and a test keeps it so: change",
        "# the function, then run  python -m tcp_upper.cluster --print-config > deploy/haproxy.cfg",
        "# See docs/CLUSTER.md.",
        "",
        "global",
        "    # Each proxied client costs two descriptors; HAProxy raises its own limit to fit.",
        f"    maxconn {maxconn}",
    ]
    if stats_socket is not None:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    # A live back end accepts in microseconds here; past 2 s, try another one.",
        f"    timeout connect {CONNECT_TIMEOUT}",
        *idle_comment,
        f"    timeout client {idle}",
        f"    timeout server {idle}",
        "    # After DESCONEXION the server half-closes: do not keep that for the full timeout.",
        f"    timeout client-fin {FIN_TIMEOUT}",
        f"    timeout server-fin {FIN_TIMEOUT}",
        "    option clitcpka",
        "    option srvtcpka",
        "    # A refused connect (an instance died, not yet marked down) is retried elsewhere.",
        "    retries 2",
        "    option redispatch 1",
        "",
        f"frontend {FRONTEND_NAME}",
        f"    bind {format_address((front_host, front_port))}",
        f"    maxconn {maxconn}",
        f"    default_backend {BACKEND_NAME}",
        "",
        f"backend {BACKEND_NAME}",
        "    # Sessions are long and uneven: send each new client to the least busy server.",
        "    balance leastconn",
        "    # Up means it answers a line in upper case, not just that its port is open. The",
        "    # check then says DESCONEXION, so the server logs a polite goodbye, not a reset.",
        "    option tcp-check",
        '    tcp-check send "ping\\nDESCONEXION\\n"',
        "    tcp-check expect string PING",
        f"    default-server inter {_interval(check.inter_ms)} fall {check.fall} rise {check.rise}",
    ]
    lines += [
        f"    server s{i} {format_address((host, port))} check"
        for i, (host, port) in enumerate(backends, start=1)
    ]
    return "\n".join(lines) + "\n"


def find_haproxy(explicit: str | None = None) -> str | None:
    """The HAProxy executable: *explicit* if it is one, else ``haproxy`` on PATH or in sbin."""
    if explicit is not None:
        found = shutil.which(explicit)
        return found
    search = os.pathsep.join(
        [os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    )
    return shutil.which("haproxy", path=search)


def parse_backend(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> ``(host, port)``; ValueError says what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--backend {text!r}: use HOST:PUERTO, p. ej. 10.0.0.2:5000")
    return host, int(port_text)


def free_port(host: str = BACKEND_HOST) -> int:
    """A port the kernel just gave out on *host* (free now; HAProxy binds it right after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def listening_ports(pid: int) -> set[int]:
    """TCP ports that process *pid* (or a direct child of it) listens on; Linux ``/proc``.

    Tells when an instance accepts connections, and on which port, whatever its log level
    (the listening log line is at INFO) and without connecting to it. Empty if unreadable.
    """
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
    inodes = set()
    for owner in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{owner}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines, None)
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class _Child:
    """One supervised process: its stdout/stderr relayed line by line by a reader thread."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.started = time.monotonic()
        self.last_lines: collections.deque[str] = collections.deque(maxlen=20)
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(
            target=self._relay, name=f"relay-{name}", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _relay(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for raw in self.process.stdout:
                line = raw.rstrip("\r\n")
                self.last_lines.append(line)
                relay_log.info("%s | %s", self.name, line)

    def last_words(self) -> str:
        """The child's first recent alert (HAProxy's), else its last line, for a message."""
        lines = [line.strip() for line in self.last_lines if line.strip()]
        for line in lines:
            if line.startswith("[ALERT]"):
                return line.split(" : ", 1)[-1]
        return lines[-1] if lines else "(sin salida)"

    def join_output(self, timeout: float) -> None:
        self._reader.join(timeout)



@dataclass
class Instance:
    """A local tcp_upper server: its HAProxy name, its port and its current process."""

    name: str
    port: int
    child: _Child | None = None
    #: Its current process listens (on ``port``).
    ready: bool = False
    exit_reported: bool = False
    restart_at: float | None = None
    restart_delay: float = RESTART_DELAY_SECONDS
    restart_count: int = 0

    @property
    def pid(self) -> int | None:
        return None if self.child is None else self.child.pid


class Cluster:
    """N tcp_upper servers on loopback plus HAProxy in front; a context manager.

    Call :meth:`start` (or enter the ``with`` block), then :meth:`supervise` periodically;
    :meth:`stop` always ends every child. A base port of 0 means any free ports: each
    instance's real port is read from /proc once it listens.
    """

    def __init__(
        self,
        front_host: str,
        front_port: int,
        *,
        haproxy: str,
        instances: int = DEFAULT_INSTANCES,
        base_port: int = 0,
        extra_backends: Iterable[tuple[str, int]] = (),
        check: HealthCheck = HealthCheck(),
        idle_timeout: float | None = None,
        log_level: str = "INFO",
        env_file: str | None = None,
        restart: bool = False,
        maxconn: int = DEFAULT_MAXCONN,
    ) -> None:
        self.front_host = front_host
        self.front_port = front_port
        self.haproxy = haproxy
        self.extra_backends = list(extra_backends)
        self.check = check
        self.idle_timeout = idle_timeout
        self.log_level = log_level
        self.env_file = env_file
        self.restart = restart
        self.maxconn = maxconn
        self.instances = [
            Instance(f"s{i + 1}", base_port + i if base_port else 0) for i in range(instances)
        ]
        self.run_dir: Path | None = None
        self.config_path: Path | None = None
        self.stats_socket: Path | None = None
        self._haproxy: _Child | None = None
        self._stopping = False
        #: Children that ignored SIGTERM in :meth:`stop` and had to be killed, by name.
        self.killed: list[str] = []

    # -- start -----------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the instances, wait until each listens, then HAProxy; ClusterError on failure.

        On failure everything already started is stopped again.
        """
        try:
            self.run_dir = Path(tempfile.mkdtemp(prefix="tcp-upper-cluster-"))
            self.config_path = self.run_dir / "haproxy.cfg"
            self.stats_socket = self.run_dir / "haproxy.sock"
            for instance in self.instances:
                self._spawn(instance)
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            for instance in self.instances:
                self._wait_ready(instance, deadline)
            if self.front_port == 0:
                self.front_port = free_port(self.front_host)
            self.config_path.write_text(self.render(), encoding="utf-8")
            self._haproxy = _Child(
                "haproxy", [self.haproxy, "-db", "-f", str(self.config_path)]
            )
            self._wait_haproxy(time.monotonic() + START_TIMEOUT_SECONDS)
        except BaseException:
            self.stop()
            raise

    def render(self) -> str:
        """This cluster's HAProxy configuration (the instances' real ports must be known)."""
        backends = [(BACKEND_HOST, instance.port) for instance in self.instances]
        return render_haproxy_config(
            self.front_host,
            self.front_port,
            backends + self.extra_backends,
            idle_timeout=self.idle_timeout,
            check=self.check,
            maxconn=self.maxconn,
            stats_socket=str(self.stats_socket),
        )

    def _spawn(self, instance: Instance) -> None:
        argv = [
            sys.executable, "-m", "tcp_upper.server",
            "--host", BACKEND_HOST,
            "--port", str(instance.port),
            "--log-level", self.log_level,
        ]
        if self.idle_timeout is not None:
            argv += ["--idle-timeout", f"{self.idle_timeout:g}"]
        if self.env_file is not None:
            argv += ["--env-file", self.env_file]
        instance.ready = False
        instance.exit_reported = False
        instance.restart_at = None
        instance.child = _Child(instance.name, argv)
        log.debug("instancia %s arrancada (PID %d)", instance.name, instance.child.pid)

    def _wait_ready(self, instance: Instance, deadline: float) -> None:
        """Wait until the instance listens, as /proc shows it (whatever its log level)."""
        assert instance.child is not None
        while not self._check_listening(instance):
            if instance.child.process.poll() is not None:
                instance.child.join_output(1.0)
                raise ClusterError(
                    f"la instancia {instance.name} no arrancó: {instance.child.last_words()}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"la instancia {instance.name} no empezó a escuchar en "
                    f"{START_TIMEOUT_SECONDS:g} s: {instance.child.last_words()}"
                )
            time.sleep(0.02)

    def _check_listening(self, instance: Instance) -> bool:
        """True once the instance listens (learning its port if it was 0); never blocks."""
        if not instance.ready and instance.child is not None:
            ports = listening_ports(instance.child.pid)
            if ports and (instance.port in ports or instance.port == 0):
                instance.port = instance.port or min(ports)
                instance.ready = True
        return instance.ready

    def _wait_haproxy(self, deadline: float) -> None:
        assert self._haproxy is not None
        while True:
            if self._haproxy.process.poll() is not None:
                self._haproxy.join_output(1.0)
                reason = self._haproxy.last_words()
                if "Address already in use" in reason:
                    reason += f"; el puerto {self.front_port} está ocupado: elija otro con --port"
                raise ClusterError(f"HAProxy no arrancó: {reason}")
            try:
                self.haproxy_command("show info")
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"HAProxy no respondió en {START_TIMEOUT_SECONDS:g} s: "
                    f"{self._haproxy.last_words()}"
                )
            time.sleep(0.02)

    # -- run -------------------------------------------------------------------------------

    @property
    def haproxy_pid(self) -> int | None:
        return None if self._haproxy is None else self._haproxy.pid

    def haproxy_command(self, command: str, timeout: float = 2.0) -> str:
        """Send one command to HAProxy's admin socket and return its answer (OSError if not)."""
        if self.stats_socket is None:
            raise OSError("HAProxy is not running")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def server_states(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of each back end, by name: ``status`` (UP/DOWN...), ``scur``, ``stot``."""
        text = self.haproxy_command("show stat")
        header, *rows = [line for line in text.splitlines() if line]
        names = header.lstrip("# ").split(",")
        states = {}
        for row in rows:
            values = dict(zip(names, row.split(",")))
            if values.get("pxname") == BACKEND_NAME and values.get("svname") != "BACKEND":
                states[values["svname"]] = values
        return states

    def supervise(self) -> None:
        """Look at the children once: log deaths, restart if asked; ClusterError if HAProxy died."""
        if self._stopping:
            return
        if self._haproxy is not None and self._haproxy.process.poll() is not None:
            self._haproxy.join_output(1.0)
            raise ClusterError(
                f"HAProxy terminó (código {self._haproxy.process.returncode}): "
                f"{self._haproxy.last_words()}"
            )
        now = time.monotonic()
        for instance in self.instances:
            child = instance.child
            if child is None:
                continue
            if child.process.poll() is None:
                if instance.restart_count and not instance.ready and (
                    self._check_listening(instance)
                ):
                    log.info("La instancia %s vuelve a escuchar en el puerto %d (PID %d)",
                             instance.name, instance.port, child.pid)
                continue
            if not instance.exit_reported:
                instance.exit_reported = True
                self._report_exit(instance, child, now)
            if instance.restart_at is not None and now >= instance.restart_at:
                log.info("Reiniciando la instancia %s en el puerto %d", instance.name,
                         instance.port)
                instance.restart_count += 1
                self._spawn(instance)

    def _report_exit(self, instance: Instance, child: _Child, now: float) -> None:
        code = child.process.returncode
        cause = f"señal {signal.Signals(-code).name}" if code < 0 else f"código {code}"
        alive = sum(1 for other in self.instances if other.child and other.child.process.poll()
                    is None)
        log.warning(
            "La instancia %s (puerto %d, PID %d) terminó (%s); HAProxy la retira tras %d "
            "comprobaciones fallidas y las %d restantes siguen atendiendo",
            instance.name, instance.port, child.pid, cause, self.check.fall, alive,
        )
        if not self.restart:
            return
        if now - child.started >= RESTART_RESET_SECONDS:
            instance.restart_delay = RESTART_DELAY_SECONDS
        instance.restart_at = now + instance.restart_delay
        log.info("Se reiniciará la instancia %s en %g s", instance.name, instance.restart_delay)
        instance.restart_delay = min(instance.restart_delay * 2, RESTART_DELAY_MAX_SECONDS)

    def restart_instance(self, name: str) -> Instance:
        """Start a dead instance again on its port and wait until it listens."""
        instance = next(i for i in self.instances if i.name == name)
        if instance.child is not None and instance.child.process.poll() is None:
            raise ClusterError(f"la instancia {name} sigue en marcha")
        self._spawn(instance)
        self._wait_ready(instance, time.monotonic() + START_TIMEOUT_SECONDS)
        return instance

    # -- stop ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Mark the cluster as stopping, so children ending now are not reported as failures."""
        self._stopping = True

    def stop(self) -> None:
        """SIGTERM each child by PID, HAProxy first (no new clients reach stopping servers),
        wait a bounded time, SIGKILL what is left; remove the run directory."""
        self._stopping = True
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        children = [self._haproxy] + [instance.child for instance in self.instances]
        self.killed += _terminate(children[:1], deadline)
        self.killed += _terminate(children[1:], deadline)
        for child in children:
            if child is not None:
                child.join_output(1.0)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None


def _terminate(children: Sequence[_Child | None], deadline: float) -> list[str]:
    """SIGTERM every running child by PID, wait until *deadline*, then SIGKILL the rest.

    Returns the names of the children that had to be killed.
    """
    killed = []
    running = [c for c in children if c is not None and c.process.poll() is None]
    for child in running:
        with contextlib.suppress(ProcessLookupError):  # it may end between poll() and here
            child.process.send_signal(signal.SIGTERM)
    for child in running:
        try:
            child.process.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            log.warning("%s (PID %d) no terminó tras SIGTERM; se mata", child.name, child.pid)
            child.process.kill()
            child.process.wait()
            killed.append(child.name)
    return killed


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tcp_upper.cluster``."""
    parser = argparse.ArgumentParser(
        prog="python -m tcp_upper.cluster",
        description="Arranca varias instancias del servidor de mayúsculas detrás de HAProxy, "
        "en esta máquina, y las vigila hasta Ctrl-C o SIGTERM. Conecte los clientes a "
        "--host/--port.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config.add_arguments(parser, CLUSTER_SETTINGS)
    parser.add_argument(
        "--instances", type=int, default=DEFAULT_INSTANCES, metavar="N",
        help=f"instancias locales del servidor (por defecto: {DEFAULT_INSTANCES})",
    )
    parser.add_argument(
        "--base-port", type=int, default=None, metavar="PUERTO",
        help="puerto de la primera instancia, las demás siguen (por defecto: --port + 1; "
        "0 = cualquiera libre)",
    )
    parser.add_argument(
        "--backend", action="append", default=[], metavar="HOST:PUERTO",
        help="otro servidor tcp_upper (p. ej. en otra máquina) que HAProxy también reparte; "
        "se puede repetir",
    )
    parser.add_argument(
        "--haproxy", metavar="RUTA",
        help="ejecutable de HAProxy (por defecto: haproxy del PATH, /usr/sbin o /usr/local/sbin)",
    )
    parser.add_argument(
        "--restart", action="store_true",
        help="reinicia una instancia que termine (esperas de 1 s que se doblan hasta 30 s)",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="solo escribe la configuración de HAProxy resultante en la salida estándar",
    )
    return parser


CLUSTER_SETTINGS = ("host", "port", "idle_timeout", "log_level")


def _resolve_base_port(args: argparse.Namespace, front_port: int) -> int:
    instances = args.instances
    if instances < 0 or instances > 64:
        raise SettingsError(
            f"valor no válido {instances} para --instances: debe estar entre 0 y 64"
        )
    base = args.base_port if args.base_port is not None else (front_port + 1 if front_port else 0)
    if base != 0 and not 1 <= base <= 65536 - instances:
        raise SettingsError(
            f"valor no válido {base} para --base-port: las {instances} instancias necesitan "
            f"puertos hasta {base + instances - 1}, y el máximo es 65535"
        )
    if base and front_port and base <= front_port < base + instances:
        raise SettingsError(
            f"--base-port {base} con {instances} instancias incluye el puerto de entrada "
            f"{front_port}; elija otro"
        )
    return base


def configure_logging(level: str) -> None:
    """Own lines with a timestamp; children's lines relayed as they are (they have theirs)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
        force=True,
    )
    relay = logging.StreamHandler(sys.stderr)
    relay.setFormatter(logging.Formatter("%(message)s"))
    relay_log.handlers[:] = [relay]
    relay_log.propagate = False
    relay_log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """``python -m tcp_upper.cluster``: 0 stopped by a signal, 1 cannot run, 2 bad settings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = config.load_settings(args, CLUSTER_SETTINGS)
        base_port = _resolve_base_port(args, settings.port)
        extra = [parse_backend(text) for text in args.backend]
    except (SettingsError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.instances == 0 and not extra:
        parser.exit(2, f"{parser.prog}: error: --instances 0 sin --backend: nada que repartir\n")
    if args.print_config:
        local = default_backends(base_port or 5001, args.instances)
        sys.stdout.write(render_haproxy_config(
            settings.host, settings.port, local + extra, idle_timeout=settings.idle_timeout
        ))
        return 0
    configure_logging(settings.log_level)
    haproxy = find_haproxy(args.haproxy)
    if haproxy is None:
        wanted = args.haproxy or "haproxy"
        log.error(
            "No se encuentra HAProxy (%s): instálelo (apt-get install haproxy) o indique su "
            "ruta con --haproxy", wanted,
        )
        return 1
    cluster = Cluster(
        settings.host, settings.port, haproxy=haproxy, instances=args.instances,
        base_port=base_port, extra_backends=extra, idle_timeout=settings.idle_timeout,
        log_level=settings.log_level, env_file=args.env_file, restart=args.restart,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cluster.request_stop()
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        ports = ", ".join(f"{i.name}={i.port}" for i in cluster.instances)
        log.info("HAProxy (PID %d) reparte entre %d servidores (%s%s); estado: echo 'show stat' "
                 "| socat stdio unix-connect:%s", cluster.haproxy_pid,
                 len(cluster.instances) + len(extra), ports,
                 "".join(f", {format_address(b)}" for b in extra), cluster.stats_socket)
        # Where to connect goes to stdout at any log level, like http.server's "Serving on".
        print(f"Cluster escuchando en {format_address((cluster.front_host, cluster.front_port))}"
              f": conecte con  python -m tcp_upper.client --host {cluster.front_host} --port "
              f"{cluster.front_port}  (Ctrl-C para parar)", flush=True)
        while not stop.wait(POLL_SECONDS):
            cluster.supervise()
        log.info("Parando el cluster")
        return 0
    except ClusterError as exc:
        if stop.is_set():  # Ctrl-C while starting also stops the children: not a failure
            log.info("Parando el cluster")
            return 0
        log.error("%s", exc)
        return 1
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
