"""Behaviour of ``tcp-upper-bench`` against tiny in-test servers on 127.0.0.1, port 0.

The project's own server is not used: these tests pin down what the tool reports for a correct
server, a wrong one, one that closes or resets early, one that never answers and one that sends
more than was asked. No timing is asserted; every run is short and bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from tcp_upper import __version__, bench
from tcp_upper.bench.payloads import build_batch
from tcp_upper.protocol import UpperProtocol, is_command

pytestmark = pytest.mark.timeout(30)

Behaviour = Callable[[socket.socket], None]
RUN = ["--host", "127.0.0.1", "--duration", "0.4", "--timeout", "5"]


# -- tiny servers ---------------------------------------------------------------------------


def upper(sock: socket.socket) -> None:
    """The correct server: every chunk back in upper case, as it arrives."""
    while data := sock.recv(65536):
        sock.sendall(data.upper())


def upper_byte_by_byte(sock: socket.socket) -> None:
    """Correct, but every reply byte in its own segment: replies arrive in pieces."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := sock.recv(65536):
        for byte in data.upper():
            sock.sendall(bytes([byte]))


def echo(sock: socket.socket) -> None:
    """Wrong: sends the bytes back unchanged."""
    while data := sock.recv(65536):
        sock.sendall(data)


def close_early(sock: socket.socket) -> None:
    """Reads the first request and hangs up without answering."""
    sock.recv(65536)


def reset_early(sock: socket.socket) -> None:
    """Reads the first request and resets the connection (SO_LINGER 0)."""
    sock.recv(65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def full(sock: socket.socket) -> None:
    """Like a full server: one ERROR line instead of replies, then it hangs up."""
    sock.sendall(b"ERROR servidor lleno\n")


def silent(sock: socket.socket) -> None:
    """Reads everything, answers nothing."""
    while sock.recv(65536):
        pass


def upper_then_extra(sock: socket.socket) -> None:
    """Correct until end of stream, then sends bytes nobody asked for."""
    upper(sock)
    sock.sendall(b"SOBRA\n")


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)  # bounded even if the tool under test misbehaves
        with contextlib.suppress(OSError):
            self.server.behaviour(self.request)  # type: ignore[attr-defined]


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], int]]:
    """Start a tiny server with a behaviour; returns its port. All are stopped afterwards."""
    started: list[tuple[_Server, threading.Thread]] = []

    def start(behaviour: Behaviour) -> int:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.behaviour = behaviour  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        started.append((server, thread))
        return server.server_address[1]

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting is refused, and no other
    process can start listening on it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    """No config.env or TCP_UPPER_* variables from the developer's machine; no stray workers."""
    monkeypatch.chdir(tmp_path)
    for name in ("TCP_UPPER_HOST", "TCP_UPPER_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield
    leftovers = multiprocessing.active_children()
    for proc in leftovers:
        proc.kill()
        proc.join(timeout=5)
    assert not leftovers, "bench left worker processes behind"


@pytest.fixture
def popen() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start subprocesses that are killed by PID at teardown if they are still running."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "tcp_upper.bench", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(timeout=5)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """bench.main in this process: (exit status, stdout, stderr)."""
    try:
        status = bench.main(list(argv))
    except SystemExit as exc:  # argparse: bad arguments, --version
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status, out, err = run(capsys, *argv, "--json")
    assert err == ""  # not a terminal: no progress line; no error line either
    return status, json.loads(out)


def assert_consistent(result: dict[str, Any]) -> None:
    latency = result["latency_us"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert result["requests"] % result["depth"] == 0
    assert result["bytes_received"] >= result["requests"] * result["size"]
    assert result["bytes_sent"] >= result["bytes_received"]
    assert result["requests_per_s"] > 0 and result["elapsed_s"] > 0
    assert result["errors"] == sum(result["errors_by_kind"].values())


# -- payload and histogram ------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 14, 100, 5000])
def test_lines_are_lowercase_letters_of_the_exact_size_and_never_the_command(size: int) -> None:
    lines = [bench.make_line(conn, line, size) for conn in (0, 1, 25, 26, 9999) for line in (0, 7)]
    for line in lines:
        assert len(line) == size and line.endswith(b"\n")
        assert re.fullmatch(rb"h[a-z ]*\n", line)
        assert line.strip().upper() not in (b"DESCONEXION", b"")
    if size >= 14:
        assert len(set(lines)) == len(lines)  # every connection and line is distinguishable
    batch = bench.make_batch(3, 4, size)
    assert len(batch) == 4 * size and batch.count(b"\n") == 4


def test_histogram_percentiles_are_within_one_percent_and_merge() -> None:
    rng = random.Random(7)
    samples = [rng.lognormvariate(-8, 1.5) for _ in range(20_000)]  # ~0.3 ms, long tail
    first, second = bench.LatencyHistogram(), bench.LatencyHistogram()
    for index, seconds in enumerate(samples):
        (first if index % 2 else second).add(seconds)
    first.merge(second)
    ordered = sorted(samples)
    assert first.count == len(samples)
    for fraction in (0.5, 0.9, 0.99, 0.999):
        exact = ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1e6
        assert first.percentile(fraction) == pytest.approx(exact, rel=0.01, abs=1)
    assert first.max_us == pytest.approx(ordered[-1] * 1e6)
    assert bench.LatencyHistogram().percentile(0.5) == 0


# -- a correct server -----------------------------------------------------------------------


def test_correct_server_gives_a_consistent_json_report_and_exit_0(capsys, serve) -> None:
    port = serve(upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "5", "--depth", "3")
    assert status == 0
    assert result["ok"] is True and result["errors"] == 0 and result["first_error"] is None
    assert result["requests"] > 0 and result["conns"] == 5 and result["processes"] == 1
    assert (result["host"], result["port"], result["depth"], result["size"]) == (
        "127.0.0.1", port, 3, 14)
    assert_consistent(result)


def test_human_report_is_a_spanish_table(capsys, serve) -> None:
    port = serve(upper)
    status, out, err = run(capsys, *RUN, "--port", str(port))
    assert status == 0 and err == ""
    for label in ("conexiones", "tiempo en conectar todas", "peticiones/s", "MB/s",
                  "latencia p50", "latencia p99", "latencia máxima", "errores"):
        assert label in out
    assert f"127.0.0.1:{port}" in out


def test_replies_arriving_one_byte_at_a_time_are_assembled(capsys, serve) -> None:
    port = serve(upper_byte_by_byte)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "2", "--depth", "4",
                              "--size", "20")
    assert status == 0 and result["errors"] == 0 and result["requests"] > 0


def test_long_lines_larger_than_socket_buffers(capsys, serve) -> None:
    port = serve(upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "2", "--depth", "3",
                              "--size", "300000")
    assert status == 0 and result["errors"] == 0
    assert_consistent(result)


def test_many_connections_all_connect(capsys, serve) -> None:
    port = serve(upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "300")
    assert status == 0 and result["conns"] == 300 and result["errors"] == 0
    assert result["connect_s"] > 0


def test_two_processes_split_the_connections_and_merge(capsys, serve) -> None:
    port = serve(upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "5", "--processes",
                              "2", "--depth", "2")
    assert status == 0 and result["processes"] == 2 and result["conns"] == 5
    assert result["errors"] == 0 and result["requests"] > 0
    assert_consistent(result)
    assert multiprocessing.active_children() == []


def test_more_processes_than_connections_is_capped(capsys, serve) -> None:
    port = serve(upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "1", "--processes",
                              "4")
    assert status == 0 and result["processes"] == 1


def test_progress_line_is_drawn_in_place_on_a_terminal(capsys, serve, monkeypatch) -> None:
    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    port = serve(upper)
    status, out, _ = run(capsys, "--host", "127.0.0.1", "--port", str(port), "--duration", "1.3")
    assert status == 0 and "peticiones/s" in out
    assert terminal.text.startswith("\r") and "peticiones/s" in terminal.text
    assert terminal.text.endswith("\r") and "\n" not in terminal.text  # erased when done


# -- wrong servers --------------------------------------------------------------------------


def test_echo_without_upper_case_is_an_error_with_the_first_mismatch(capsys, serve) -> None:
    port = serve(echo)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "3")
    assert status == 1 and result["ok"] is False
    assert result["errors_by_kind"] == {"mismatch": 3}
    assert "se esperaba 'H" in result["first_error"] and "llegó 'h" in result["first_error"]


def test_echo_error_in_the_table_and_exit_1(capsys, serve) -> None:
    port = serve(echo)
    status, out, _ = run(capsys, *RUN, "--port", str(port))
    assert status == 1
    assert re.search(r"errores\s+10 \(respuesta incorrecta: 10\)", out)
    assert "primer error" in out


@pytest.mark.parametrize("behaviour", [close_early, reset_early], ids=["close", "reset"])
def test_server_hanging_up_early_is_an_error(capsys, serve, behaviour) -> None:
    port = serve(behaviour)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "2")
    assert status == 1 and result["errors"] == 2
    assert set(result["errors_by_kind"]) <= {"eof", "reset"}
    if behaviour is reset_early:
        assert result["errors_by_kind"] == {"reset": 2}


def test_an_error_line_then_close_is_reported_as_the_wrong_reply_it_is(capsys, serve) -> None:
    port = serve(full)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "2", "--size", "40")
    assert status == 1 and result["errors_by_kind"] == {"mismatch": 2}
    assert "llegó 'ERROR servidor lleno\\n'" in result["first_error"]


def test_server_that_never_answers_times_out(capsys, serve) -> None:
    port = serve(silent)
    status, result = run_json(capsys, "--host", "127.0.0.1", "--port", str(port), "--duration",
                              "0.2", "--timeout", "0.5", "--conns", "2")
    assert status == 1 and result["errors_by_kind"] == {"timeout": 2}
    assert result["requests"] == 0


def test_bytes_after_the_last_reply_are_an_error(capsys, serve) -> None:
    port = serve(upper_then_extra)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "2")
    assert status == 1 and result["errors_by_kind"] == {"extra": 2}
    assert result["requests"] > 0
    assert "SOBRA" in result["first_error"]


# -- cannot run -----------------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_connection_refused_is_one_line_naming_host_and_port(capsys, refused_port,
                                                              processes) -> None:
    status, out, err = run(capsys, "--host", "127.0.0.1", "--port", str(refused_port),
                           "--processes", processes, "--conns", "4")
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert f"127.0.0.1:{refused_port}" in err and "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux drops SYNs to a full queue")
def test_server_that_does_not_accept_makes_connecting_time_out(capsys) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: the queue fills and further connects hang
        port = listener.getsockname()[1]
        status, out, err = run(capsys, "--host", "127.0.0.1", "--port", str(port), "--conns",
                               "20", "--timeout", "0.5")
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "0.5 s" in err


@pytest.mark.parametrize("argv", [
    ["--conns", "0"], ["--conns", "muchas"], ["--depth", "-1"], ["--size", "1"],
    ["--duration", "0"], ["--duration", "nan"], ["--processes", "0"], ["--timeout", "-2"],
    ["--port", "70000"], ["--port", "abc"], ["--port", "0"], ["--host", "a b"],
    ["--env-file", "no-existe.env"], ["--conns", "100000", "--depth", "100", "--size", "1000"],
    ["--desconocido"],
])
def test_bad_arguments_exit_2_without_traceback(capsys, argv) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert "error" in err and "Traceback" not in err


def test_bad_port_in_the_environment_names_the_variable(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TCP_UPPER_PORT", "abc")
    status, _, err = run(capsys)
    assert status == 2 and "TCP_UPPER_PORT" in err and "abc" in err


def test_host_and_port_come_from_the_shared_settings(capsys, serve, monkeypatch,
                                                     tmp_path) -> None:
    port = serve(upper)
    (tmp_path / "config.env").write_text("TCP_UPPER_HOST=127.0.0.1\nTCP_UPPER_PORT=1\n")
    monkeypatch.setenv("TCP_UPPER_PORT", str(port))  # environment beats config.env
    status, result = run_json(capsys, "--duration", "0.3")
    assert status == 0 and result["port"] == port and result["host"] == "127.0.0.1"


def test_plot_without_matplotlib_is_a_clean_error_before_connecting(capsys, monkeypatch,
                                                                    refused_port) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    status, out, err = run(capsys, "--host", "127.0.0.1", "--port", str(refused_port),
                           "--plot", "lat.png")
    assert status == 2 and out == ""  # 2, not the 1 of a refused connection
    assert len(err.splitlines()) == 1 and "matplotlib" in err and "Traceback" not in err


def test_plot_is_written_as_png(capsys, serve, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    port = serve(upper)
    path = tmp_path / "latencia.png"
    status, _, _ = run(capsys, *RUN, "--port", str(port), "--plot", str(path))
    assert status == 0
    assert path.read_bytes().startswith(b"\x89PNG")


def test_version(capsys) -> None:
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"tcp-upper-bench {__version__}"


# -- end to end, as a user runs it ----------------------------------------------------------


def test_module_runs_end_to_end_with_json(serve, popen) -> None:
    port = serve(upper)
    proc = popen(*RUN, "--port", str(port), "--conns", "3", "--processes", "2", "--json")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err == ""
    result = json.loads(out)
    assert result["ok"] is True and result["requests"] > 0 and result["processes"] == 2


def test_module_refused_connection_prints_one_line(refused_port, popen) -> None:
    env = {**os.environ, "TCP_UPPER_HOST": "127.0.0.1", "TCP_UPPER_PORT": str(refused_port)}
    proc = popen(env=env)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out == ""
    assert err.count("\n") == 1 and f"127.0.0.1:{refused_port}" in err
    assert "Traceback" not in err


# -- payload classes ------------------------------------------------------------------------


def protocol_upper(sock: socket.socket) -> None:
    """Correct for every payload class: the project's own protocol (Unicode upper case,
    non-UTF-8 bytes passed through, a split character completed by the next read)."""
    protocol = UpperProtocol()
    while data := sock.recv(65536):
        sock.sendall(protocol.feed(data).data)


@pytest.mark.parametrize("name", list(bench.PAYLOADS))
@pytest.mark.parametrize("size", [2, 14, 4096])
def test_every_payload_class_is_whole_lines_of_at_least_size_with_the_protocols_reply(
        name: str, size: int) -> None:
    batch = build_batch(bench.PAYLOADS[name], 3, 5, size)
    assert len(batch.ends) == 5
    starts = [0, *batch.ends[:-1]]
    replies = [batch.expected[a:b] for a, b in zip(starts, batch.ends)]
    protocol = UpperProtocol()
    sent = b""
    for reply in replies:
        unit = batch.data[len(sent):]
        end = len(unit)
        # Each unit is whole lines of at least `size` bytes: find where it ends by its reply.
        for cut in range(size, end + 1):
            if unit[cut - 1:cut] == b"\n" and UpperProtocol().feed(unit[:cut]).data == reply:
                end = cut
                break
        assert unit[:end].endswith(b"\n") and len(unit[:end]) >= size
        assert protocol.feed(unit[:end]) == (reply, False) and not protocol.holding
        sent += unit[:end]
    assert sent == batch.data
    assert batch.units_done(0, len(batch.expected)) == 5
    assert batch.units_done(batch.ends[0] - 1, batch.ends[1]) == 2


def test_payload_classes_are_what_their_names_say() -> None:
    def lines(name: str) -> list[bytes]:
        return build_batch(bench.PAYLOADS[name], 0, 40, 2).data.splitlines()

    assert set(lines("d-lines")) == {b"d"}
    assert all(line[:1] in (b" ", b"\t") for line in lines("blank-start"))
    assert all(not line.isascii() and line.decode() for line in lines("non-ascii"))
    assert all(line.strip().lower() == b"desconexiones" for line in lines("near-miss"))
    assert all("desconexi" in line.decode().lower() and not is_command(line.decode())
               for line in lines("word-in-line"))
    spanish = b"".join(lines("spanish")).decode()
    assert not spanish.isascii() and "ñ" in spanish and "¿" in spanish
    random_lines = lines("random-bytes")
    assert all(b"\n" not in line for line in random_lines)
    with pytest.raises(UnicodeDecodeError):
        b"".join(random_lines).decode()


@pytest.mark.parametrize("name", list(bench.PAYLOADS))
def test_every_class_moves_the_same_bytes_per_batch(name: str) -> None:
    # As many bytes as an ascii batch (one 64 KiB server read each), in whole lines.
    batch = build_batch(bench.PAYLOADS[name], 3, 16, 4096)
    assert len(batch.data) == 16 * 4096 and batch.data.endswith(b"\n")
    assert all(batch.data[end - 1:end] == b"\n" for end in range(4096, 16 * 4096 + 1, 4096))


@pytest.mark.parametrize("name", list(bench.PAYLOADS))
def test_each_payload_class_runs_against_a_correct_server(capsys, serve, name: str) -> None:
    port = serve(protocol_upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "2", "--depth", "4",
                              "--size", "300", "--payload", name)
    assert status == 0 and result["errors"] == 0 and result["requests"] > 0
    assert result["payload"] == name


def test_a_server_upper_casing_only_ascii_fails_the_spanish_class(capsys, serve) -> None:
    port = serve(upper)  # bytes.upper(): "ñ" comes back as "ñ"
    status, result = run_json(capsys, *RUN, "--port", str(port), "--payload", "spanish")
    # Every connection whose sentence has an accent gets a wrong reply (one sentence is ASCII).
    assert status == 1 and set(result["errors_by_kind"]) == {"mismatch"}
    assert "se esperaba" in result["first_error"]


def test_payload_file_lines_are_sent_in_turn(capsys, serve, tmp_path) -> None:
    path = tmp_path / "lineas.txt"
    path.write_bytes("¿qué tal?\ndesconexiones\nñandú".encode())  # no newline at the end
    port = serve(protocol_upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--payload-file", str(path))
    assert status == 0 and result["errors"] == 0 and result["requests"] > 0
    assert result["payload"] == f"fichero {path}"


@pytest.mark.parametrize(("content", "message"), [
    (b"", "está vacío"),
    (b"hola\n  DESCONEXI\xc3\x93N\r\nadios\n", "orden de desconexión"),
])
def test_unusable_payload_file_is_one_line_and_exit_2(capsys, tmp_path, content, message) -> None:
    path = tmp_path / "lineas.txt"
    path.write_bytes(content)
    status, out, err = run(capsys, *RUN, "--port", "1", "--payload-file", str(path))
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_payload_file_and_two_payloads_are_refused(capsys, tmp_path) -> None:
    status, _, err = run(capsys, *RUN, "--port", "1", "--payload-file", str(tmp_path / "no"))
    assert status == 2 and "no se puede leer" in err
    status, _, err = run(capsys, *RUN, "--payload", "ascii", "--payload-file", "x")
    assert status == 2 and "--payload-file" in err and "Traceback" not in err


def test_tail_figures_p999_and_first_reply_are_reported(capsys, serve) -> None:
    port = serve(upper)
    status, result = run_json(capsys, *RUN, "--port", str(port), "--conns", "3")
    assert status == 0
    latency, first = result["latency_us"], result["first_reply_us"]
    assert latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert 0 < first["p50"] <= first["p99"] <= first["max"]
    status, out, _ = run(capsys, *RUN, "--port", str(port))
    assert "latencia p99.9" in out and "primera respuesta p50 / p99 / máx." in out
