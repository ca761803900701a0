"""UpperClient (docs/PROTOCOL.md §2, the thin class): round trips, line breaks, any size, failures.

Servers are the in-process ``server`` fixture (its log read with caplog) or a spawned process.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import DEADLINE
from test_client import bytes_received, closed_port, server_log, wait_for_reasons

from tcp_upper.client import UpperClient
from tcp_upper.errors import UpperClientError

__all__ = ["server_log"]  # a fixture used here


def test_upper_client_round_trip_and_close_on_exit(server, server_log):
    with UpperClient("127.0.0.1", server.port, timeout=DEADLINE) as client:
        assert client.send("hola servidor") == "HOLA SERVIDOR"
        assert client.send("ñandú") == "ÑANDÚ"
        assert client.send("") == ""
        assert not client.closed
    assert client.closed
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


def test_upper_client_close_is_idempotent_and_send_after_close_fails(server, server_log):
    client = UpperClient("127.0.0.1", server.port, timeout=DEADLINE)
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(UpperClientError):
        client.send("hola")
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


@pytest.mark.parametrize("text", ["a\nb", "a\r\nb", "a\n", "\n"])
def test_upper_client_rejects_line_breaks(server, text):
    with UpperClient("127.0.0.1", server.port, timeout=DEADLINE) as client:
        with pytest.raises(ValueError):
            client.send(text)
        assert client.send("sigue") == "SIGUE"  # nothing was sent; the connection is intact


@pytest.mark.parametrize("command", ["DESCONEXION", "  desconexion\t", "Desconexión"])
def test_upper_client_send_command_closes(server, server_log, command):
    with UpperClient("127.0.0.1", server.port, timeout=DEADLINE) as client:
        assert client.send(command) == ""
        assert client.closed
        with pytest.raises(UpperClientError):
            client.send("hola")
    assert wait_for_reasons(server_log, 1) == ["DESCONEXION"]


def test_upper_client_connection_refused():
    port = closed_port()
    with pytest.raises(UpperClientError) as caught:
        UpperClient("127.0.0.1", port, timeout=DEADLINE)
    assert isinstance(caught.value, ConnectionError)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_upper_client_reply_timeout():
    # A listening socket that is never accepted from: the kernel completes the handshake,
    # nobody ever answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        client = UpperClient("127.0.0.1", port, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(UpperClientError) as caught:
            client.send("x")
        elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3.0
    message = str(caught.value)
    assert "0.3" in message
    assert f"127.0.0.1:{port}" in message
    assert client.closed


def test_upper_client_server_full(start_server):
    full = start_server(max_clients=1)
    with UpperClient("127.0.0.1", full.port, timeout=DEADLINE) as first:
        assert first.send("uno") == "UNO"
        second = UpperClient("127.0.0.1", full.port, timeout=DEADLINE)
        with pytest.raises(UpperClientError) as caught:
            second.send("dos")
        assert "ERROR" in str(caught.value)
        assert f"127.0.0.1:{full.port}" in str(caught.value)
        assert second.closed
        assert first.send("tres") == "TRES"


def test_upper_client_echo_of_error_is_not_a_refusal(server):
    with UpperClient("127.0.0.1", server.port, timeout=DEADLINE) as client:
        assert client.send("error de prueba") == "ERROR DE PRUEBA"
        assert client.send("ok") == "OK"


def test_upper_client_echo_of_error_with_an_undecodable_byte(server):
    with UpperClient("127.0.0.1", server.port, timeout=DEADLINE) as client:
        assert client.send("error \udcff").startswith("ERROR ")  # os.fsdecode(b"error \xff")
        assert not client.closed
        assert client.send("ok") == "OK"


def test_upper_client_server_gone(spawn_server):
    proc = spawn_server()
    client = UpperClient("127.0.0.1", proc.port, timeout=DEADLINE)
    assert client.send("uno") == "UNO"
    proc.signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(UpperClientError) as caught:
        client.send("dos")
    assert f"127.0.0.1:{proc.port}" in str(caught.value)
    assert client.closed
    client.close()  # already closed: still fine


@pytest.mark.parametrize(("text", "reply"), [
    ("hola\rmundo", "HOLA\rMUNDO"),  # a bare CR is data
    ("\rb", "\rB"),
    ("fin\r", "FIN"),  # a CR at the end makes the line end in CRLF, and so does the reply
    ("dos\r\r", "DOS\r"),
])
def test_upper_client_carriage_returns(server, server_log, text, reply):
    with UpperClient("127.0.0.1", server.port, timeout=DEADLINE) as client:
        assert client.send(text) == reply
        assert client.send("sigue") == "SIGUE"
    wait_for_reasons(server_log, 1)
    assert bytes_received(server_log) == len(text) + 1 + len("sigue\n") + len("DESCONEXION\n")


def test_upper_client_sends_and_receives_a_32_mib_line(spawn_server):
    # The whole line does not fit in the two sides' socket buffers: the client must read the
    # reply while it is still sending (a client that writes everything first deadlocks).
    proc = spawn_server()
    text = "abcdefghijklmnopqrstuvwxyzñ" * (32 * 1024 * 1024 // 28)
    with UpperClient("127.0.0.1", proc.port, timeout=DEADLINE) as client:
        reply = client.send(text)
        assert len(reply) == len(text)
        assert reply == text.upper()
        assert client.send("sigue") == "SIGUE"
