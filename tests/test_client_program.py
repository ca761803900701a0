"""The client program through pipes: one-shot mode, lines of any size, a bare CR, standard output
that cannot be written, its help and error lines, and how it names the server's command.

Every client is a real subprocess in an empty directory with TCP_UPPER_* variables removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEADLINE, clean_env, connect, recv_exactly
from test_client import closed_port, run_client, server_log, wait_for_reasons

__all__ = ["server_log"]  # a fixture used here

PROGRAMS = ["tcp_upper.server", "tcp_upper.client"]
PREFIX = "tcp-upper-client: error: "


def client(*args: str, cwd: Path, stdin: str = "", **kwargs: object,
           ) -> subprocess.CompletedProcess[str]:
    """``python -m tcp_upper.client ARGS`` run to completion (killed after DEADLINE)."""
    return subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", *args], input=stdin, capture_output=True,
        text=True, encoding="utf-8", cwd=cwd, env=clean_env(), timeout=DEADLINE,
        **kwargs,  # type: ignore[call-overload]
    )


def one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The only line on stderr, after checking the exit status and that nothing crashed."""
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + (result.stdout or "")
    return lines[0]


# --- one-shot mode -----------------------------------------------------------------------------


def test_one_shot_prints_only_the_reply(server, server_log, tmp_path):
    result = client("--host", "127.0.0.1", "--port", str(server.port), "hola", "servidor",
                    cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "HOLA SERVIDOR\n", "")
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


def test_one_shot_words_are_joined_by_one_space(server, tmp_path):
    result = client("--port", str(server.port), "--host", "127.0.0.1", "--", "-a", " b",
                    "ñandú", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "-A  B ÑANDÚ\n")


def test_one_shot_desconexion_only_closes(server, server_log, tmp_path):
    result = client("--port", str(server.port), "--host", "127.0.0.1", "desconexion",
                    cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


def test_one_shot_refuses_two_lines(server, tmp_path):
    result = client("--port", str(server.port), "uno\ndos", cwd=tmp_path)
    assert "MENSAJE" in one_error_line(result, 2)
    assert result.stdout == ""


def test_one_shot_server_not_running(tmp_path):
    port = closed_port()
    line = one_error_line(client("--host", "127.0.0.1", "--port", str(port), "hola",
                                 cwd=tmp_path), 1)
    assert line.startswith(PREFIX + "no se puede conectar con 127.0.0.1:")
    # The hint names the server the way this client was run: the same python, with -m.
    if hasattr(sys, "orig_argv"):  # Python 3.10+; 3.9 names sys.executable, which is this one
        assert f"'{sys.executable} -m tcp_upper.server'" in line


def test_one_shot_server_full(start_server, tmp_path):
    full = start_server(max_clients=1)
    with connect(full.port) as holder:
        holder.sendall(b"ocupado\n")
        assert recv_exactly(holder, 8) == b"OCUPADO\n"
        result = client("--host", "127.0.0.1", "--port", str(full.port), "hola", cwd=tmp_path)
    line = one_error_line(result, 1)
    assert line.startswith(PREFIX) and "rechazó la conexión: ERROR" in line
    assert result.stdout == ""


CONSOLE_SCRIPT = Path(sys.executable).parent / "tcp-upper-client"


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the console scripts are not installed")
@pytest.mark.parametrize("on_path", [True, False])
def test_console_script_hint_names_the_console_script(on_path, tmp_path):
    env = clean_env()
    if on_path:  # run as a bare name, found on PATH
        env["PATH"] = f"{CONSOLE_SCRIPT.parent}{os.pathsep}{env.get('PATH', '')}"
    command = "tcp-upper-client" if on_path else str(CONSOLE_SCRIPT)
    result = subprocess.run(
        [command, "--host", "127.0.0.1", "--port", str(closed_port()), "hola"], text=True,
        capture_output=True, encoding="utf-8", cwd=tmp_path, env=env, timeout=DEADLINE,
    )
    expected = "tcp-upper-server" if on_path else str(CONSOLE_SCRIPT.parent / "tcp-upper-server")
    assert f"'{expected}'" in one_error_line(result, 1)


# --- any line, any output ----------------------------------------------------------------------


def test_a_32_mib_line_through_a_pipe_comes_back_whole(spawn_server, tmp_path):
    # Far more than both sides' socket buffers: a client that sent it all before reading the
    # reply used to stall until --timeout.
    proc = spawn_server()
    line = "abcdefghijklmnopqrstuvwxyzñ" * (32 * 1024 * 1024 // 28)
    result = run_client(proc.port, line + "\nsigue\n", "--host", "127.0.0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-1000:]
    assert result.stdout == (f"Cliente envía: {line}\nServidor responde: {line.upper()}\n"
                             "Cliente envía: sigue\nServidor responde: SIGUE\n"
                             "Conexión cerrada.\n")


def test_a_bare_carriage_return_is_part_of_the_line(server, tmp_path):
    result = subprocess.run(  # bytes: text mode would read the CR as a line end
        [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1", "--port",
         str(server.port)], input="hola\rmundo\nadiós\n".encode(), capture_output=True,
        cwd=tmp_path, env=clean_env(), timeout=DEADLINE,
    )
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == (
        "Cliente envía: hola\rmundo\nServidor responde: HOLA\rMUNDO\n"
        "Cliente envía: adiós\nServidor responde: ADIÓS\nConexión cerrada.\n"
    )


def test_stdout_closed_by_its_reader_ends_quietly(server, server_log, tmp_path):
    # What `client | head -1` does, in order: the reader takes one line and goes away, then the
    # client has more to write.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1", "--port",
         str(server.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=tmp_path, env=clean_env(),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"uno\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "Cliente envía: uno\n".encode()
        proc.stdout.close()
        proc.stdin.write(b"dos\n")
        proc.stdin.close()
        status = proc.wait(DEADLINE)
        stderr = proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait(DEADLINE)
        proc.stderr.close()  # type: ignore[union-attr]
    assert (status, stderr) == (141, "")  # 128 + SIGPIPE, as a shell shows `yes | head -1`
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]  # it still closed in order


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("args", [(), ("hola",)])
def test_full_stdout_ends_with_one_line(args, server, tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1", "--port",
             str(server.port), *args], input="hola\n", stdout=full, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", cwd=tmp_path, env=clean_env(), timeout=DEADLINE,
        )
    line = one_error_line(result, 1)
    assert line == PREFIX + "no se puede escribir la salida: no queda espacio"


# --- help, errors and settings of the program --------------------------------------------------

#: argparse's own English, any of which would mean a text left untranslated.
ENGLISH = re.compile(r"usage|options|show|help message|positional|optional|arguments?\b|"
                     r"default|version number|expected|unrecognized|invalid|required", re.I)


@pytest.mark.parametrize("module", [*PROGRAMS, "tcp_upper.bench", "tcp_upper.cluster"])
def test_help_is_all_spanish(module, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True,
        encoding="utf-8", cwd=tmp_path, env=clean_env(), timeout=DEADLINE,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("uso: ")
    assert "opciones:" in result.stdout
    assert "muestra esta ayuda y termina" in result.stdout
    assert "muestra la versión del programa y termina" in result.stdout
    assert not ENGLISH.findall(result.stdout.replace("--help", "")), result.stdout


def test_client_help_describes_the_client(tmp_path):
    text = client("--help", cwd=tmp_path).stdout
    flags = {m.group(1): m.group(2) for m in re.finditer(
        r"^  (--[a-z-]+)[^\n]*?  +(\S[^\n]*(?:\n {20,}[^\n]*)*)", text, flags=re.M)}
    assert "escuchar" not in flags["--host"]
    assert "0 =" not in flags["--port"] and "libre" not in flags["--port"]
    assert "MENSAJE" in text


@pytest.mark.parametrize(("args", "words"), [
    (("--port",), ["uso: ", "argumento --port: se esperaba un valor"]),
    (("--no-such-flag",), ["argumentos no reconocidos: --no-such-flag"]),
])
@pytest.mark.parametrize("module", PROGRAMS)
def test_argparse_errors_are_spanish(module, args, words, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True,
        encoding="utf-8", cwd=tmp_path, env=clean_env(), timeout=DEADLINE,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    for word in words:
        assert word in result.stderr
    assert not ENGLISH.findall(result.stderr.split("\n", 1)[-1]), result.stderr


def test_client_refuses_port_0(tmp_path):
    line = one_error_line(client("--port", "0", "hola", cwd=tmp_path), 2)
    assert line == (PREFIX + "valor no válido '0' para --port en la línea de órdenes: debe ser "
                    "un número entero entre 1 y 65535")


@pytest.mark.parametrize("bad", ["5_000", "\u0665\u0660\u0660\u0660", "50 00", "+5000"])
def test_client_refuses_integers_that_are_not_ascii_digits(bad, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", "hola"], capture_output=True, text=True,
        encoding="utf-8", cwd=tmp_path, env=clean_env(TCP_UPPER_PORT=bad), timeout=DEADLINE,
    )
    line = one_error_line(result, 2)
    assert line.startswith(PREFIX) and "TCP_UPPER_PORT" in line and repr(bad) in line


def test_client_reads_its_env_file_from_a_pipe(server, tmp_path):
    # What `--env-file <(printf 'TCP_UPPER_PORT=...\n')` gives the program: /dev/fd/N, a pipe.
    read_end, write_end = os.pipe()
    os.write(write_end, f"TCP_UPPER_HOST=127.0.0.1\nTCP_UPPER_PORT={server.port}\n".encode())
    os.close(write_end)
    try:
        result = client("--env-file", f"/dev/fd/{read_end}", "hola", cwd=tmp_path,
                        pass_fds=(read_end,))
    finally:
        os.close(read_end)
    assert (result.returncode, result.stdout, result.stderr) == (0, "HOLA\n", "")


def test_every_client_error_has_the_same_prefix(tmp_path):
    settings = one_error_line(client("--timeout", "-1", cwd=tmp_path), 2)
    connection = one_error_line(client("--host", "127.0.0.1", "--port", str(closed_port()),
                                       cwd=tmp_path), 1)
    assert settings.startswith(PREFIX) and connection.startswith(PREFIX)
