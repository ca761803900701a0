"""Hosts on one machine for fault-injection tests: network namespaces joined by veth links.

Each :class:`Host` is a Linux network namespace with one address, joined to the test's own
(root) namespace by a veth pair on a /30 of its own, and runs one ``python -m tcp_upper.server``
bound to that address. HAProxy and the clients stay in the root namespace, so every connection
to a host crosses a real link that the test can break:

- :meth:`Network.impair` sends a host's traffic through ``netem.py`` (a user-space netem, see
  there why) with a delay and a loss rate; loss 1 is a silent partition. :meth:`Network.heal`
  puts the plain link back.
- :meth:`Network.kill_server` (SIGKILL), :meth:`Network.freeze` / :meth:`Network.thaw`
  (SIGSTOP / SIGCONT) and :meth:`Network.start_servers` act on server processes, by PID.

Addresses come from 198.18.0.0/15 (RFC 2544, for benchmarks: no real network uses it), one /24
per run that no interface here already uses. Every name starts with ``tcpu<pid>`` (the test
process's PID), so parallel runs never collide, and :func:`sweep_stale` removes what a run that
died (SIGKILL, power cut) left behind: names whose PID no longer runs. Namespaces have no
default route, so servers can reach nothing but the root namespace's end of their link.

:meth:`Network.close` removes every process, link and namespace; it also runs at interpreter
exit for a network still open, so an interrupted run leaves nothing either.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import LISTEN, tcp_sockets

PREFIX = "tcpu"
#: This run's names: namespaces ``<RUN>n<i>``, veth ends ``<RUN>h<i>``, TUN ends ``<RUN>w<i>``
#: (root side) and ``<RUN>v<i>`` (host side). Interface names fit Linux's 15 characters.
RUN = f"{PREFIX}{os.getpid()}"
NAME = re.compile(rf"^{PREFIX}(\d+)([nhwv])\d+$")
#: Where each host's server listens (its namespace has its own ports: any fixed one works).
SERVER_PORT = 7000
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
#: Bound on every ``ip`` command and on a server or link starting.
COMMAND_TIMEOUT = 10.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
NETEM = Path(__file__).with_name("netem.py")


class NetnsError(RuntimeError):
    """A command that builds or changes the test network failed; the message says which."""


def ip(*args: str) -> str:
    """Run ``ip ARGS`` (bounded) and return its output; NetnsError with its stderr if it fails."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def running(pid: int) -> bool:
    """True if *pid* runs (a zombie, ended but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_unavailable: list[str | None] = []


def unavailable() -> str | None:
    """Why hosts cannot be made here (a skip reason), or None; probed once per run."""
    if not _unavailable:
        _unavailable.append(probe())
    return _unavailable[0]


def probe() -> str | None:
    """Why hosts cannot be made here, found by making one (and removing it); None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' is not installed (apt-get install iproute2)"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "no /dev/net/tun, needed to emulate a bad link"
    name = f"{RUN}n0"
    try:
        ip("netns", "add", name)
        try:
            ip("link", "add", f"{RUN}h0", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("link", "del", f"{RUN}h0")
        finally:
            ip("netns", "del", name)
    except NetnsError as exc:
        return f"the kernel refuses network namespaces or veth links: {exc}"
    return None


def our_namespaces(run: str = RUN) -> list[str]:
    """Namespaces named for run *run* that exist now."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return [name for name in names if name.startswith(run + "n") and NAME.match(name)]


def our_links(run: str = RUN) -> list[str]:
    """Root-namespace interfaces named for run *run* that exist now."""
    return [name for name in _link_names() if _run_of(name) == run]


def _run_of(name: str) -> str | None:
    match = NAME.match(name)
    return f"{PREFIX}{match.group(1)}" if match else None


def _link_names() -> list[str]:
    return [line.split()[0].split("@")[0] for line in ip("-br", "link").splitlines()
            if line.strip()]


def sweep_stale() -> list[str]:
    """Remove what earlier runs whose process is gone left behind; return what it removed.

    Their namespaces (after killing the processes in them: only a dead run's servers can be
    there), their links, and the HAProxy that ``tcp_upper.cluster`` ran for them: found by a
    configuration that names one of those namespaces' addresses.
    """
    removed: list[str] = []
    addresses: set[str] = set()
    namespaces = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    for name in namespaces:
        match = NAME.match(name)
        if match and match.group(2) == "n" and not running(int(match.group(1))):
            with contextlib.suppress(NetnsError):
                addresses.update(re.findall(r"inet (\S+)/", ip("-n", name, "-4", "addr")))
                for pid in ip("netns", "pids", name).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                ip("netns", "del", name)
                removed.append(name)
    for name in _link_names():
        match = NAME.match(name)
        if match and not running(int(match.group(1))):
            with contextlib.suppress(NetnsError):  # a veth may go with its namespace meanwhile
                ip("link", "del", name)
                removed.append(name)
    return removed + _kill_orphan_haproxy(addresses - {"127.0.0.1"})


def _kill_orphan_haproxy(addresses: set[str]) -> list[str]:
    """Kill each HAProxy whose configuration has a server at one of *addresses*."""
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not argv[0].endswith("haproxy") or "-f" not in argv:
                continue
            config = Path(argv[argv.index("-f") + 1])
            servers = re.findall(r"^\s*server \S+ ([\d.]+):", config.read_text(), re.MULTILINE)
        except (OSError, IndexError, ValueError):
            continue
        if addresses.intersection(servers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(f"HAProxy {proc.name}")
            if config.parent.name.startswith("tcp-upper-cluster-"):
                shutil.rmtree(config.parent, ignore_errors=True)
    return killed


def pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface here uses, chosen from this run's PID."""
    subnets = list(RANGE.subnets(new_prefix=24))
    for step in range(len(subnets)):
        subnet = subnets[(os.getpid() + step) % len(subnets)]
        if not ip("-o", "-4", "addr", "show", "to", str(subnet)).strip():
            return subnet
    raise NetnsError(f"every /24 of {RANGE} is in use")


def listens(pid: int, port: int) -> bool:
    """True once process *pid* has a listening TCP socket on *port*, seen in its namespace."""
    return (port, LISTEN) in tcp_sockets(pid, f"/proc/{pid}/net/tcp")


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGCONT (a frozen process cannot act on SIGTERM), SIGTERM, then SIGKILL: by PID, bounded."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class Host:
    """One namespace: its names, its addresses, and the processes the network runs for it."""

    def __init__(self, number: int, first: ipaddress.IPv4Address) -> None:
        self.namespace = f"{RUN}n{number}"
        self.link = f"{RUN}h{number}"  # the root namespace's end of its veth pair
        self.wire_ends = (f"{RUN}w{number}", f"{RUN}v{number}")  # root end, host end
        self.gateway = str(first + 1)  # the root namespace's address on the link
        self.address = str(first + 2)
        self.server: subprocess.Popen[bytes] | None = None
        self.wire: subprocess.Popen[bytes] | None = None

    @property
    def backend(self) -> tuple[str, int]:
        """Where HAProxy reaches this host's server."""
        return self.address, SERVER_PORT

    @property
    def pid(self) -> int:
        assert self.server is not None, f"{self.namespace} has no server"
        return self.server.pid


class Network:
    """Hosts joined to this namespace; a context manager that removes everything on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.subnet = pick_subnet()
        self.hosts: list[Host] = []
        #: Every process started for this network, to prove none is left.
        self.pids: list[int] = []
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("TCP_UPPER_")}
        _open_networks.append(self)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_host(self) -> Host:
        """A new namespace with its veth link, addresses up; no server yet."""
        if len(self.hosts) == self.subnet.num_addresses // 4:
            raise NetnsError(f"{self.subnet} has no /30 left")
        host = Host(next(_host_numbers), self.subnet.network_address + 4 * len(self.hosts))
        self.hosts.append(host)
        ip("netns", "add", host.namespace)
        ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0",
           "netns", host.namespace)
        ip("addr", "add", f"{host.gateway}/30", "dev", host.link)
        ip("link", "set", host.link, "up")
        inside = ("-n", host.namespace)
        ip(*inside, "addr", "add", f"{host.address}/30", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")
        return host

    def start_servers(self, hosts: list[Host]) -> None:
        """Run ``tcp_upper.server`` inside each host on its address; return once all listen."""
        for host in hosts:
            with open(self.workdir / f"{host.namespace}.log", "ab") as log:
                host.server = subprocess.Popen(
                    ["ip", "netns", "exec", host.namespace,  # ip execs it: the same PID
                     sys.executable, "-m", "tcp_upper.server", "--host", host.address,
                     "--port", str(SERVER_PORT), "--log-level", "WARNING",
                     # as behind a real front: PROXY v2 from HAProxy's side of the link only
                     "--proxy-protocol", "--trusted-proxies", f"{host.gateway}/32"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.workdir, env=self._env,  # no config.env there, no TCP_UPPER_*
                )
            self.pids.append(host.server.pid)
        deadline = time.monotonic() + START_TIMEOUT
        for host in hosts:
            while not listens(host.pid, SERVER_PORT):
                if host.server is None or host.server.poll() is not None or (
                        time.monotonic() > deadline):
                    raise NetnsError(f"the server in {host.namespace} did not start listening: "
                                     f"{self.server_log(host)[-500:]}")
                time.sleep(0.02)

    def server_log(self, host: Host) -> str:
        path = self.workdir / f"{host.namespace}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def kill_server(self, host: Host) -> None:
        """``kill -9`` the host's server and wait (bounded) until it is gone."""
        assert host.server is not None
        host.server.kill()
        host.server.wait(STOP_TIMEOUT)

    def freeze(self, host: Host) -> None:
        """SIGSTOP the server: a hung process whose kernel still accepts connections."""
        os.kill(host.pid, signal.SIGSTOP)

    def thaw(self, host: Host) -> None:
        os.kill(host.pid, signal.SIGCONT)

    def impair(self, host: Host, delay: float, loss: float) -> None:
        """From now on, the host's packets (both ways) wait *delay* s and are lost with *loss*.

        Traffic leaves the veth for a TUN pair relayed by ``netem.py``: a /32 route on each side
        beats the /30 of the link, and established connections follow it at once.
        """
        outside, inside = host.wire_ends
        host.wire = subprocess.Popen(
            [sys.executable, str(NETEM), outside, inside, f"{delay:g}", f"{loss:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # its stdin closing stops it
        )
        self.pids.append(host.wire.pid)
        assert host.wire.stdout is not None
        ready, _, _ = select.select([host.wire.stdout], [], [], START_TIMEOUT)
        if not ready or host.wire.stdout.readline().strip() != b"ready":
            self._stop_wire(host)
            raise NetnsError(f"netem.py did not start within {START_TIMEOUT:g} s")
        ip("link", "set", inside, "netns", host.namespace)
        ip("link", "set", outside, "up")
        ip("-n", host.namespace, "link", "set", inside, "up")
        ip("-n", host.namespace, "route", "add", f"{host.gateway}/32", "dev", inside,
           "src", host.address)
        ip("route", "add", f"{host.address}/32", "dev", outside, "src", host.gateway)

    def heal(self, host: Host) -> None:
        """Put the plain link back: routes through the emulator removed, the emulator stopped."""
        ip("route", "del", f"{host.address}/32")
        ip("-n", host.namespace, "route", "del", f"{host.gateway}/32")
        self._stop_wire(host)

    def _stop_wire(self, host: Host) -> None:
        if host.wire is not None:
            assert host.wire.stdin is not None and host.wire.stdout is not None
            host.wire.stdin.close()  # end of file: it exits and the kernel drops its devices
            host.wire.stdout.close()
            try:
                host.wire.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                host.wire.kill()
                host.wire.wait(STOP_TIMEOUT)
            host.wire = None

    def close(self) -> None:
        """Stop every process by PID, then delete every link and namespace; idempotent."""
        if self in _open_networks:
            _open_networks.remove(self)
        for host in self.hosts:
            if host.server is not None:
                stop_process(host.server)
            self._stop_wire(host)
        for host in self.hosts:
            with contextlib.suppress(NetnsError):
                # Only our processes can be in our namespace (a server's own children, if any).
                for pid in ip("netns", "pids", host.namespace).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(NetnsError):  # deleting one end deletes the pair, now
                ip("link", "del", host.link)
            with contextlib.suppress(NetnsError):
                ip("netns", "del", host.namespace)

    def leftovers(self) -> list[str]:
        """What of this network still exists: namespaces, links, running processes."""
        processes = [f"PID {pid}" for pid in self.pids if running(pid)]
        return our_namespaces() + our_links() + processes


#: Host numbers over the whole run, so no name is reused while the kernel may still free it.
_host_numbers = itertools.count(1)
_open_networks: list[Network] = []


@atexit.register
def _close_open_networks() -> None:
    """A run that ended without its fixtures' teardown (an interrupt) still leaves nothing."""
    for network in list(_open_networks):
        network.close()
