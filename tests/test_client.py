"""The client program (docs/PROTOCOL.md §2): piped and at a terminal, line editing, failures.

The program runs as a real subprocess (``python -m tcp_upper.client``) in an empty directory with
TCP_UPPER_* variables removed; the interactive cases go through a real pseudo-terminal (pexpect).
Servers are the in-process ``server`` fixture (its log is read with caplog) or a spawned process.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pexpect
import pytest
from conftest import DEADLINE, SYN_SENT, clean_env, connect, recv_exactly, tcp_sockets, wait_until

TRANSCRIPT = (
    "Cliente envía: hola servidor\n"
    "Servidor responde: HOLA SERVIDOR\n"
    "Cliente envía: DESCONEXION\n"
    "Conexión cerrada.\n"
)

DISCONNECTED = re.compile(r"Cliente (\S+) desconectado: (.+)$")
RECEIVED = re.compile(r"\b(\d+) bytes recibidos")


# --- helpers ------------------------------------------------------------------------------------


def run_client(port: int, stdin: str, *args: str, cwd: Path,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the client with *stdin* piped in; killed if it outlives DEADLINE."""
    return subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", "--port", str(port), *args],
        input=stdin, capture_output=True, text=True, encoding="utf-8", cwd=cwd,
        env=env if env is not None else clean_env(), timeout=DEADLINE,
    )


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in list(caplog.records)]


def disconnect_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m.group(2) for m in map(DISCONNECTED.search, messages(caplog)) if m]


def wait_for_reasons(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """Wait until the in-process server logged *count* disconnects; return their reasons."""
    wait_until(lambda: len(disconnect_reasons(caplog)) >= count,
               what=f"{count} disconnect log lines")
    return disconnect_reasons(caplog)


def bytes_received(caplog: pytest.LogCaptureFixture) -> int:
    """Total bytes the in-process server read from clients (its DEBUG traffic lines)."""
    return sum(int(m.group(1)) for m in map(RECEIVED.search, messages(caplog)) if m)


def assert_still_serving(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"otra vez\n")
        assert recv_exactly(sock, 9) == b"OTRA VEZ\n"


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog capturing the in-process server's INFO and DEBUG lines."""
    caplog.set_level(logging.DEBUG, logger="tcp_upper")
    return caplog


@pytest.fixture
def spawn_client(tmp_path: Path) -> Iterator[Callable[..., pexpect.spawn]]:
    """Factory: the client on a real pseudo-terminal; every child is killed at teardown."""
    children: list[pexpect.spawn] = []

    def spawn(port: int, *args: str, columns: int = 80, **env: str) -> pexpect.spawn:
        child = pexpect.spawn(
            sys.executable, ["-m", "tcp_upper.client", "--port", str(port), *args],
            cwd=str(tmp_path), env=clean_env(**env), encoding="utf-8", timeout=DEADLINE,
            dimensions=(24, columns),
        )
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.isalive():
            child.terminate(force=True)
        child.close(force=True)


def finish(child: pexpect.spawn) -> tuple[int, str]:
    """Wait for the child to end; return its exit status and its output since the last match."""
    child.expect(pexpect.EOF)
    output = child.before
    child.wait()
    assert child.signalstatus is None, f"killed by signal {child.signalstatus}"
    return child.exitstatus, output


# --- piped standard input ----------------------------------------------------------------------


def test_piped_transcript_is_the_exercise_example(server, server_log, tmp_path):
    result = run_client(server.port, "hola servidor\nDESCONEXION\n", cwd=tmp_path)
    assert result.stdout == TRANSCRIPT
    assert result.stderr == ""
    assert result.returncode == 0
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


def test_piped_end_of_input_closes_like_desconexion(server, server_log, tmp_path):
    result = run_client(server.port, "hola servidor\n", cwd=tmp_path)
    assert result.stdout == (
        "Cliente envía: hola servidor\nServidor responde: HOLA SERVIDOR\nConexión cerrada.\n"
    )
    assert result.returncode == 0
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


def test_piped_blank_lines_are_not_sent(server, server_log, tmp_path):
    result = run_client(server.port, "\n   \n\t\nhola\n\nDESCONEXION\n", cwd=tmp_path)
    assert result.returncode == 0
    replies = [line for line in result.stdout.splitlines() if line.startswith("Servidor")]
    assert replies == ["Servidor responde: HOLA"]
    wait_for_reasons(server_log, 1)
    # Only "hola\n" (5 bytes) and "DESCONEXION\n" (12 bytes) ever reached the server.
    assert bytes_received(server_log) == 5 + 12


def test_piped_unicode_and_crlf_input(server, tmp_path):
    result = run_client(server.port, "ñandú straße\r\n  desconexion \r\n", cwd=tmp_path)
    assert result.stdout.splitlines() == [
        "Cliente envía: ñandú straße",
        "Servidor responde: ÑANDÚ STRASSE",
        "Cliente envía:   desconexion ",
        "Conexión cerrada.",
    ]
    assert result.returncode == 0


# --- interactive, through a pseudo-terminal ----------------------------------------------------

PROMPT = "Cliente envía: "


def test_interactive_session(server, server_log, spawn_client):
    child = spawn_client(server.port)
    child.expect_exact(PROMPT)
    child.sendline("hola servidor")
    child.expect_exact("Servidor responde: HOLA SERVIDOR")
    child.expect_exact(PROMPT)
    child.sendline("")  # empty input: asked again, nothing sent
    child.expect_exact(PROMPT)
    assert "Servidor responde" not in child.before
    child.sendline("   ")
    child.expect_exact(PROMPT)
    assert "Servidor responde" not in child.before
    child.sendline("ñandú")
    child.expect_exact("Servidor responde: ÑANDÚ")
    child.expect_exact(PROMPT)
    child.sendline("DESCONEXION")
    child.expect_exact("Conexión cerrada.")
    status, output = finish(child)
    assert status == 0
    assert "Traceback" not in output
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]
    # "hola servidor\n" + "ñandú\n" (8 bytes in UTF-8) + "DESCONEXION\n": the blanks never left.
    assert bytes_received(server_log) == 14 + 8 + 12
    assert_still_serving(server.port)


def test_interactive_command_in_lower_case_with_spaces(server, server_log, spawn_client):
    child = spawn_client(server.port)
    child.expect_exact(PROMPT)
    child.sendline("  desconexion ")
    child.expect_exact("Conexión cerrada.")
    status, _ = finish(child)
    assert status == 0
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]
    assert_still_serving(server.port)


def test_interactive_ctrl_d_closes_in_order(server, server_log, spawn_client):
    child = spawn_client(server.port)
    child.expect_exact(PROMPT)
    child.sendline("hola")
    child.expect_exact("Servidor responde: HOLA")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect_exact("Conexión cerrada.")
    status, output = finish(child)
    assert status == 0
    assert "Traceback" not in output
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]
    assert_still_serving(server.port)


def test_interactive_ctrl_c_exits_130_without_traceback(server, server_log, spawn_client):
    child = spawn_client(server.port)
    child.expect_exact(PROMPT)
    child.sendline("hola")
    child.expect_exact("Servidor responde: HOLA")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect_exact("Conexión cerrada.")
    status, output = finish(child)
    assert status == 130
    assert "Traceback" not in child.before + output
    assert "KeyboardInterrupt" not in output
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]
    assert_still_serving(server.port)


def connecting(pid: int) -> bool:
    """True while the process has a TCP socket waiting for the server's SYN-ACK (SYN_SENT)."""
    return any(state == SYN_SENT for _, state in tcp_sockets(pid))


# Regression (fixed in fac81f7): Ctrl-C while connecting, or while waiting for the server's close
# after Ctrl-D or a first Ctrl-C, printed a KeyboardInterrupt traceback and died by SIGINT.


def test_interactive_ctrl_c_while_connecting(spawn_client):
    # A server whose listen queue is full: the kernel drops further SYNs, so connect() waits.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                fillers.append(filler)
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            child = spawn_client(port, "--host", "127.0.0.1")
            wait_until(lambda: connecting(child.pid), what="the client stuck in connect()")
            child.sendintr()
            status, output = finish(child)
        finally:
            for filler in fillers:
                filler.close()
    assert "Traceback" not in output
    assert status == 130


@contextlib.contextmanager
def mute_server(spawn_client) -> Iterator[tuple[pexpect.spawn, socket.socket]]:
    """A server that reads but never answers nor closes by itself: yields the client (its
    --timeout 30 s) at its prompt, and the accepted connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(DEADLINE)
        child = spawn_client(listener.getsockname()[1], "--host", "127.0.0.1", "--timeout", "30")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            child.expect_exact(PROMPT)
            yield child, conn


def until_half_closed(conn: socket.socket) -> bytes:
    """What the client sends until it half-closes (it is then waiting for the close)."""
    received = b""
    while chunk := conn.recv(4096):
        received += chunk
    return received


@pytest.mark.parametrize("first", ["Ctrl-D", "Ctrl-C", "DESCONEXION"])
def test_interactive_ctrl_c_while_waiting_for_the_close(first, spawn_client):
    # The client's close waits (bounded by --timeout) and the user presses Ctrl-C meanwhile.
    with mute_server(spawn_client) as (child, conn):
        {"Ctrl-D": child.sendeof, "Ctrl-C": child.sendintr,
         "DESCONEXION": lambda: child.sendline("DESCONEXION")}[first]()
        assert until_half_closed(conn) == b"DESCONEXION\n"
        child.sendintr()
        status, output = finish(child)
    assert "Traceback" not in output
    assert status == 130


def test_interactive_ctrl_c_while_waiting_for_a_reply(spawn_client):
    # Ctrl-C ends the wait for the reply at once, and the client says DESCONEXION and waits for
    # the close. Its waits are sliced, so a Ctrl-C that lands just before one starts is not held
    # until that wait ends.
    with mute_server(spawn_client) as (child, conn):
        child.sendline("hola")
        assert recv_exactly(conn, len(b"hola\n")) == b"hola\n"
        child.sendintr()
        assert until_half_closed(conn) == b"DESCONEXION\n"
    status, output = finish(child)  # the server closed: the client's wait ends
    assert "Traceback" not in output
    assert status == 130


# --- failures of the program -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", None])
def test_server_not_running(host, tmp_path):
    port = closed_port()
    args = ("--host", host) if host else ()
    result = run_client(port, "hola\n", *args, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{host or 'localhost'}:{port}" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "Servidor responde" not in result.stdout


def test_server_full(start_server, tmp_path):
    full = start_server(max_clients=1)
    with connect(full.port) as holder:
        holder.sendall(b"ocupado\n")
        assert recv_exactly(holder, 8) == b"OCUPADO\n"  # admitted: the one slot is taken
        result = run_client(full.port, "hola\nDESCONEXION\n", "--host", "127.0.0.1", cwd=tmp_path)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert "ERROR" in lines[0]
        assert f"127.0.0.1:{full.port}" in lines[0]
        assert "Traceback" not in result.stderr + result.stdout
        assert "Conexión cerrada." not in result.stdout
        # The client holding the slot is unaffected.
        holder.sendall(b"sigo\n")
        assert recv_exactly(holder, 5) == b"SIGO\n"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_server_gone_while_at_the_prompt(stop, spawn_server, tmp_path):
    # Nothing is typed after the server goes: the client notices by itself, says so in one line
    # and exits 1; readline has put the terminal back (stty, run after it, shows icanon echo).
    proc = spawn_server()
    child = pexpect.spawn(
        "sh", ["-c", '"$@"; echo "estado $?"; stty -a', "sh", sys.executable, "-m",
               "tcp_upper.client", "--host", "127.0.0.1", "--port", str(proc.port)],
        cwd=str(tmp_path), env=clean_env(), encoding="utf-8", timeout=DEADLINE,
    )
    try:
        child.expect_exact(PROMPT)
        child.sendline("uno")
        child.expect_exact("Servidor responde: UNO")
        child.expect_exact(PROMPT)
        child.send("a medias")  # typed, not sent
        child.expect_exact("a medias")
        proc.signal(stop)
        child.expect(r"estado (\d+)")
        assert child.match.group(1) == "1"
        lines = [line for line in child.before.splitlines() if line.strip()]
        settings = child.read()
    finally:
        child.close(force=True)
    assert lines == [f"tcp-upper-client: error: el servidor 127.0.0.1:{proc.port} "
                     "cerró la conexión"], lines
    assert re.search(r"(?<!-)icanon", settings) and re.search(r"(?<!-)\becho\b", settings)
    assert "Traceback" not in settings


def test_full_server_is_reported_at_the_prompt(start_server, spawn_client):
    full = start_server(max_clients=1)
    with connect(full.port) as holder:
        holder.sendall(b"ocupado\n")
        assert recv_exactly(holder, 8) == b"OCUPADO\n"
        child = spawn_client(full.port, "--host", "127.0.0.1")
        status, output = finish(child)  # nothing typed: the refusal is noticed when it arrives
    assert status == 1
    # The prompt may or may not have been shown by then.
    lines = [line for line in output.splitlines() if line.strip() and line != PROMPT]
    assert len(lines) == 1, output
    assert f"127.0.0.1:{full.port} rechazó la conexión: ERROR" in lines[0]


# --- line editing at the terminal (readline) ---------------------------------------------------

LEFT, UP = "\x1b[D", "\x1b[A"


def test_arrows_edit_the_line_before_it_is_sent(server, server_log, spawn_client):
    child = spawn_client(server.port)
    child.expect_exact(PROMPT)
    child.send(f"abc{LEFT}{LEFT}X\r")  # the cursor goes back two places: aXbc
    child.expect_exact("Servidor responde: AXBC\r\n")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child)[0] == 0
    wait_for_reasons(server_log, 1)
    assert bytes_received(server_log) == len("aXbc\n") + len("DESCONEXION\n")


def test_up_arrow_sends_the_last_message_again(server, spawn_client):
    child = spawn_client(server.port)
    child.expect_exact(PROMPT)
    child.sendline("primero")
    child.expect_exact("Servidor responde: PRIMERO\r\n")
    child.expect_exact(PROMPT)
    child.sendline("segundo")
    child.expect_exact("Servidor responde: SEGUNDO\r\n")
    child.expect_exact(PROMPT)
    child.send(f"{UP}{UP}\r")
    child.expect_exact("Servidor responde: PRIMERO\r\n")
    child.expect_exact(PROMPT)
    child.send(f"{UP}\r")
    child.expect_exact("Servidor responde: PRIMERO\r\n")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child)[0] == 0


def test_pasted_lines_are_one_message_each(server, spawn_client):
    # A terminal that supports it wraps a paste in ESC[200~ ... ESC[201~; readline then keeps its
    # line breaks inside the one line it returns.
    child = spawn_client(server.port, TERM="xterm")
    child.expect_exact(PROMPT)
    child.send("\x1b[200~uno\ndos\r\ndesconexion\ntres\x1b[201~\r")
    child.expect_exact("Servidor responde: UNO\r\n")
    child.expect_exact("Servidor responde: DOS\r\n")
    child.expect_exact("Conexión cerrada.")
    status, output = finish(child)
    assert status == 0
    assert "TRES" not in output and "Traceback" not in output


def test_a_6000_character_line_at_the_terminal_arrives_whole(server, spawn_client):
    # The terminal's canonical mode cuts lines at 4,095 bytes; readline reads past that. The
    # line is typed in pieces, reading the echo of each, so neither side's pty buffer fills;
    # the terminal is wide enough that the echo is not wrapped.
    text = "".join(chr(ord("a") + i % 26) for i in range(6000))
    child = spawn_client(server.port, columns=8000)
    child.expect_exact(PROMPT)
    for start in range(0, len(text), 500):
        child.send(text[start:start + 500])
        child.expect_exact(text[start + 450:start + 500])
    child.send("\r")
    child.expect(r"Servidor responde: ([A-Z]*)\r\n")
    assert child.match.group(1) == text.upper()
    child.expect_exact(PROMPT)
    child.sendeof()
    assert finish(child)[0] == 0


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("--port", "abc"), {}, ["--port", "abc", "línea de órdenes"]),
        ((), {"TCP_UPPER_TIMEOUT": "-1"}, ["TCP_UPPER_TIMEOUT", "-1", "entorno"]),
        ((), {"TCP_UPPER_PORT": "70000"}, ["TCP_UPPER_PORT", "70000", "entorno"]),
    ],
)
def test_bad_client_settings_exit_2(args, env, named, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", *args], input="hola\n", capture_output=True,
        text=True, encoding="utf-8", cwd=tmp_path, env=clean_env(**env), timeout=DEADLINE,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in named:
        assert word in lines[0]
    assert result.stdout == ""
