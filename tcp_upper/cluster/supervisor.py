"""Process supervision: N tcp_upper servers on loopback and HAProxy in front of them.

:class:`Cluster` starts the instances, each with ``--ready-fd`` (it writes its bound port to a
pipe once it listens, so there is no port to guess and no ``/proc`` to read), binds the front's
listening socket itself and hands it to HAProxy as ``fd@N`` (port 0 works, and no other process
can take the port in between), then watches: an instance that dies is logged (and restarted
with ``restart``), HAProxy dying is a :class:`ClusterError`. :meth:`Cluster.stop` ends every
child by PID, HAProxy first.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
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

from ..errors import TcpUpperError
from ..server.threaded import LISTEN_BACKLOG
from ..system import format_address, listen_address
from .render import (
    BACKEND_HOST,
    BACKEND_NAME,
    DEFAULT_CHECK,
    DEFAULT_INSTANCES,
    DEFAULT_MAXCONN,
    HealthCheck,
    render_haproxy_config,
)

log = logging.getLogger(__name__.rpartition(".")[0])
#: Children's own log lines, relayed unchanged (they already carry a timestamp and level).
relay_log = logging.getLogger(log.name + ".relay")

#: Seconds an instance or HAProxy gets to accept connections before start-up fails.
START_TIMEOUT_SECONDS = 10.0
#: Seconds all children get, together, to exit after SIGTERM before they are killed.
STOP_TIMEOUT_SECONDS = 5.0
#: With --restart: first delay before restarting a dead instance, and the cap of its doubling.
RESTART_DELAY_SECONDS, RESTART_DELAY_MAX_SECONDS = 1.0, 30.0
#: An instance that lived this long before dying is restarted after the first delay again.
RESTART_RESET_SECONDS = 60.0
#: How often the start-up polls HAProxy's admin socket until it answers.
HAPROXY_POLL_SECONDS = 0.02


class ClusterError(TcpUpperError):
    """The cluster cannot start or keep running; the message says what failed and what to do."""


def find_haproxy(explicit: str | None = None) -> str | None:
    """The HAProxy executable: *explicit* if it is one, else ``haproxy`` on PATH or in sbin."""
    if explicit is not None:
        return shutil.which(explicit)
    search = os.pathsep.join(
        [os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    )
    return shutil.which("haproxy", path=search)


def bind_front(host: str, port: int) -> socket.socket:
    """The front's listening socket, for HAProxy to inherit; ClusterError if it cannot listen.

    Binding here, not in HAProxy, makes port 0 usable (the real port is known before HAProxy
    starts) and leaves no moment in which another process could take a probed free port.
    """
    try:
        family, address = listen_address(host, port)
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ClusterError(f"no se puede escuchar en {format_address((host, port))}: "
                           f"{exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ClusterError(f"el puerto {port} está ocupado ({format_address((host, port))}): "
                               "elija otro con --port (0 = uno libre)") from None
        raise ClusterError(f"no se puede escuchar en {format_address((host, port))}: "
                           f"{exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class _Child:
    """One supervised process: its stdout/stderr relayed line by line by a reader thread."""

    def __init__(self, name: str, argv: list[str], pass_fds: Sequence[int] = ()) -> None:
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
            pass_fds=pass_fds,
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
    #: Read end of the current process's ``--ready-fd`` pipe, until it has said its port.
    ready_pipe: int | None = None
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
    instance tells its real port through its ``--ready-fd`` pipe; a front port of 0 too, and
    :attr:`front_port` is the real one once started. With *tls_cert* (a PEM holding the
    certificate chain and key) HAProxy speaks TLS to clients.
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
        check: HealthCheck = DEFAULT_CHECK,
        idle_timeout: float | None = None,
        log_level: str = "INFO",
        env_file: str | None = None,
        restart: bool = False,
        maxconn: int = DEFAULT_MAXCONN,
        tls_cert: str | None = None,
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
        self.tls_cert = tls_cert
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
        """Bind the front, start the instances, wait until each listens, then start HAProxy
        on the front socket; ClusterError on failure, after stopping what was started."""
        front: socket.socket | None = None
        try:
            front = bind_front(self.front_host, self.front_port)
            self.front_port = front.getsockname()[1]
            self.run_dir = Path(tempfile.mkdtemp(prefix="tcp-upper-cluster-"))
            self.config_path = self.run_dir / "haproxy.cfg"
            self.stats_socket = self.run_dir / "haproxy.sock"
            for instance in self.instances:
                self._spawn(instance)
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            for instance in self.instances:
                self._wait_ready(instance, deadline)
            self.config_path.write_text(self.render(front.fileno()), encoding="utf-8")
            self._haproxy = _Child("haproxy", [self.haproxy, "-db", "-f", str(self.config_path)],
                                   pass_fds=[front.fileno()])
            front.close()  # HAProxy holds it now: if HAProxy dies, the port is free again
            self._wait_haproxy(time.monotonic() + START_TIMEOUT_SECONDS)
        except BaseException:
            if front is not None:
                front.close()
            self.stop()
            raise

    def render(self, front_fd: int | None = None) -> str:
        """This cluster's HAProxy configuration (the instances' real ports must be known);
        with *front_fd*, HAProxy listens on that inherited socket."""
        backends = [(BACKEND_HOST, instance.port) for instance in self.instances]
        return render_haproxy_config(
            self.front_host,
            self.front_port,
            backends + self.extra_backends,
            idle_timeout=self.idle_timeout,
            check=self.check,
            maxconn=self.maxconn,
            stats_socket=str(self.stats_socket),
            tls_cert=self.tls_cert,
            front_fd=front_fd,
        )

    def _spawn(self, instance: Instance) -> None:
        """Start the instance's process; it writes its port to a fresh ready pipe."""
        read_end, write_end = os.pipe()
        argv = [
            sys.executable, "-m", "tcp_upper.server",
            "--host", BACKEND_HOST,
            "--port", str(instance.port),
            "--log-level", self.log_level,
            # Only HAProxy (on this machine, from BACKEND_HOST) may connect, with a PROXY header.
            "--proxy-protocol",
            "--trusted-proxies", f"{BACKEND_HOST}/32",
            "--ready-fd", str(write_end),
        ]
        if self.idle_timeout is not None:
            argv += ["--idle-timeout", f"{self.idle_timeout:g}"]
        if self.env_file is not None:
            argv += ["--env-file", self.env_file]
        self._close_ready_pipe(instance)
        instance.ready = False
        instance.exit_reported = False
        instance.restart_at = None
        try:
            instance.child = _Child(instance.name, argv, pass_fds=[write_end])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child's copy is the one that matters: EOF if it dies
        instance.ready_pipe = read_end
        log.debug("instancia %s arrancada (PID %d)", instance.name, instance.child.pid)

    @staticmethod
    def _close_ready_pipe(instance: Instance) -> None:
        if instance.ready_pipe is not None:
            os.close(instance.ready_pipe)
            instance.ready_pipe = None

    def _wait_ready(self, instance: Instance, deadline: float) -> None:
        """Wait until the instance reports its port on its ready pipe (or fails to)."""
        assert instance.child is not None
        while not self._check_listening(instance, max(deadline - time.monotonic(), 0)):
            if instance.ready_pipe is None:  # end of the pipe without a port: it failed
                with contextlib.suppress(subprocess.TimeoutExpired):
                    instance.child.process.wait(max(deadline - time.monotonic(), 0.01))
                instance.child.join_output(1.0)
                raise ClusterError(
                    f"la instancia {instance.name} no arrancó: {instance.child.last_words()}"
                )
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"la instancia {instance.name} no empezó a escuchar en "
                    f"{START_TIMEOUT_SECONDS:g} s: {instance.child.last_words()}"
                )

    def _check_listening(self, instance: Instance, timeout: float = 0.0) -> bool:
        """True once the instance said its port on the ready pipe (learning it if it was 0);
        waits up to *timeout* s for it. At the pipe's end without a port, the pipe is closed."""
        if instance.ready or instance.ready_pipe is None:
            return instance.ready
        if not select.select([instance.ready_pipe], [], [], timeout)[0]:
            return False
        # One short write(): a pipe delivers it whole (under PIPE_BUF bytes).
        text = os.read(instance.ready_pipe, 64).decode("ascii", "replace").strip()
        self._close_ready_pipe(instance)
        if text.isdigit():
            instance.port = int(text)
            instance.ready = True
        return instance.ready

    def _wait_haproxy(self, deadline: float) -> None:
        """Wait until HAProxy answers on its admin socket (it then serves the front)."""
        assert self._haproxy is not None
        while True:
            if self._haproxy.process.poll() is not None:
                self._haproxy.join_output(1.0)
                raise ClusterError(f"HAProxy no arrancó: {self._haproxy.last_words()}")
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
            time.sleep(HAPROXY_POLL_SECONDS)  # no event says it is ready: poll its socket

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
        for instance in self.instances:
            self._close_ready_pipe(instance)
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
