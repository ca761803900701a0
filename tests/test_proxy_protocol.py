"""PROXY protocol v1/v2: the parser without sockets, then ``--proxy-protocol`` on a live server.

The live tests use in-process servers on loopback port 0 (conftest's ``start_server``); the
command-line ones run ``python -m tcp_upper.server``. Headers are built here the way HAProxy
writes them (spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import DEADLINE, clean_env, connect, examples, recv_until_closed, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcp_upper import proxy_protocol as pp
from tcp_upper.protocol import UpperProtocol
from tcp_upper.server import proxy as door

CLIENT = ("203.0.113.7", 4242)
FRONT = ("198.51.100.1", 5000)


def v1(source: tuple[str, int] = CLIENT, destination: tuple[str, int] = FRONT) -> bytes:
    version = ipaddress.ip_address(source[0]).version
    return (f"PROXY TCP{version} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def v2(source: tuple[str, int] | None = CLIENT, destination: tuple[str, int] = FRONT,
       tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY over TCP from *source*, or LOCAL (a health check) when it is None."""
    if source is None:
        return pp.V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    family = socket.AF_INET if ipaddress.ip_address(source[0]).version == 4 else socket.AF_INET6
    block = (socket.inet_pton(family, source[0]) + socket.inet_pton(family, destination[0])
             + struct.pack("!HH", source[1], destination[1]))
    code = 0x11 if family == socket.AF_INET else 0x21
    return pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, code, len(block) + len(tlvs)) + (
        block + tlvs)


# -- the parser, without sockets --------------------------------------------------------------


@pytest.mark.parametrize("header", [v1(), v2(), v1(("2001:db8::7", 1), ("2001:db8::1", 2)),
                                    v2(("2001:db8::7", 1), ("2001:db8::1", 2), tlvs=b"\x04\0\0")],
                         ids=["v1-tcp4", "v2-tcp4", "v1-tcp6", "v2-tcp6-with-tlv"])
def test_a_header_is_need_more_until_complete_then_parsed(header: bytes) -> None:
    for cut in range(len(header)):
        assert pp.parse(header[:cut]) is None, cut
    parsed = pp.parse(header + b"hola\n")
    assert parsed is not None
    assert parsed.length == len(header) and parsed.leftover == b"hola\n"
    assert parsed.command == pp.PROXY and not parsed.local
    assert parsed.version == (1 if header.startswith(b"PROXY") else 2)
    assert parsed.source in (CLIENT, ("2001:db8::7", 1))


def test_v2_local_and_v1_unknown_carry_no_address() -> None:
    local = pp.parse(v2(None))
    assert local is not None and local.local and local.source is None and local.length == 16
    unknown = pp.parse(b"PROXY UNKNOWN whatever the sender says\r\nx")
    assert unknown is not None and unknown.source is None and not unknown.local
    assert unknown.leftover == b"x"
    unix = pp.parse(pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + bytes(216))
    assert unix is not None and unix.family == socket.AF_UNIX and unix.source is None


@pytest.mark.parametrize("data", [
    b"hola\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
    b"PROXY " + b"A" * 101,  # 107 bytes without CRLF
    pp.V2_SIGNATURE + struct.pack("!BBH", 0x11, 0x11, 12),  # version 1 in a v2 block
    pp.V2_SIGNATURE + struct.pack("!BBH", 0x22, 0x11, 12),  # command 2
    pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x41, 12),  # family 4
    pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4) + bytes(4),  # address cut short
    pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x12, 12) + bytes(12),  # UDP
    pp.V2_SIGNATURE[:5] + b"X",
], ids=lambda data: repr(data[:24]))
def test_invalid_headers_raise_the_modules_error(data: bytes) -> None:
    with pytest.raises(pp.ProxyProtocolError):
        pp.parse(data)


def test_an_oversized_v2_header_is_refused_from_its_first_16_bytes() -> None:
    fixed = pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, pp.V2_MAX_PAYLOAD + 1)
    with pytest.raises(pp.ProxyProtocolError, match="demasiado grande"):
        pp.parse(fixed)
    at_limit = v2(tlvs=bytes(pp.V2_MAX_PAYLOAD - 12))
    assert pp.parse(at_limit) is not None


endpoints = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
valid_headers = st.one_of(
    st.builds(v1, endpoints, endpoints),
    st.builds(v2, endpoints, endpoints, st.binary(max_size=64)),
    st.just(v2(None)),
    st.just(b"PROXY UNKNOWN\r\n"),
)
#: Random bytes, valid headers cut anywhere or followed by anything, and valid prefixes followed
#: by garbage (oversized v2 lengths included, since the two length bytes are garbage then).
fuzz_inputs = st.one_of(
    st.binary(max_size=200),
    st.tuples(valid_headers, st.binary(max_size=40)).map(lambda t: t[0] + t[1]),
    st.tuples(valid_headers, st.integers(0, 120)).map(lambda t: t[0][:t[1]]),
    st.tuples(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", pp.V2_SIGNATURE,
                               pp.V2_SIGNATURE + b"\x21\x11"]),
              st.binary(max_size=120)).map(lambda t: t[0] + t[1]),
)


@given(fuzz_inputs)
def test_the_parser_only_ever_raises_its_own_error(data: bytes) -> None:
    try:
        header = pp.parse(data)
    except pp.ProxyProtocolError:
        return
    if header is not None:  # the leftover is exactly what follows the header
        assert 0 < header.length <= len(data) and data[header.length:] == header.leftover
        assert header.length <= max(pp.V1_MAX_BYTES, pp.V2_FIXED_BYTES + pp.V2_MAX_PAYLOAD)
        # More bytes never change a parsed header: the decision was on its own bytes only.
        again = pp.parse(data + b"more")
        assert again is not None and again.length == header.length


@given(valid_headers, st.binary(max_size=40))
def test_valid_headers_parse_with_the_tail_as_leftover(header: bytes, tail: bytes) -> None:
    parsed = pp.parse(header + tail)
    assert parsed is not None and parsed.length == len(header) and parsed.leftover == tail


def test_trusted_networks() -> None:
    nets = pp.parse_networks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.9"])
    assert pp.is_trusted("10.1.2.3", nets) and pp.is_trusted("192.0.2.9", nets)
    assert pp.is_trusted("::ffff:10.1.2.3", nets)  # an IPv4 peer on an IPv6 socket
    assert pp.is_trusted("2001:db8::1", nets) and not pp.is_trusted("127.0.0.1", nets)
    assert pp.is_trusted("::1", pp.DEFAULT_TRUSTED_PROXIES)
    with pytest.raises(ValueError, match="CIDR"):
        pp.parse_networks(["10.0.0.0/33"])


# -- the server with --proxy-protocol -----------------------------------------------------------


def talk(port: int, data: bytes) -> bytes:
    """Send *data*, end the stream, return everything the server sent until it closed."""
    with connect(port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_closed(sock)


def connected_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if " conectado " in r.getMessage()]


@pytest.mark.parametrize("build", [v1, v2], ids=["v1", "v2"])
def test_a_trusted_header_names_the_client_and_is_not_echoed(start_server, caplog, build) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server(proxy_protocol=True)
    # The header and the first line in one segment: the line is the client's, not the header's.
    assert talk(server.port, build() + b"hola\n") == b"HOLA\n"
    wait_until(lambda: any("203.0.113.7:4242 desconectado" in r.getMessage()
                           for r in caplog.records), what="the disconnect line")
    [line] = connected_lines(caplog)
    assert line.getMessage().startswith("Cliente 203.0.113.7:4242 conectado")
    assert line.levelno == logging.INFO


def test_a_header_split_over_segments_is_read_whole(start_server) -> None:
    server = start_server(proxy_protocol=True)
    header = v2()
    with connect(server.port) as sock:
        for piece in (header[:3], header[3:14], header[14:20], header[20:] + b"ho"):
            sock.sendall(piece)
        sock.sendall(b"la\nDESCONEXION\n")
        assert recv_until_closed(sock) == b"HOLA\n"


def test_a_v2_local_connection_is_served_and_logged_at_debug(start_server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server(proxy_protocol=True)
    assert talk(server.port, v2(None) + b"ping\nDESCONEXION\n") == b"PING\n"
    wait_until(lambda: any("desconectado" in r.getMessage() for r in caplog.records),
               what="the disconnect line")
    lines = [r for r in caplog.records if "conectado" in r.getMessage()]
    assert len(lines) == 2 and all(r.levelno == logging.DEBUG for r in lines), lines


@pytest.mark.parametrize(("data", "reason"), [
    (b"hola\n", "cabecera PROXY no válida"),
    (b"", "cerró la conexión"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "cabecera PROXY no válida"),
], ids=["no-header", "nothing", "bad-header"])
def test_a_missing_or_bad_header_gets_one_error_line(start_server, caplog, data, reason) -> None:
    server = start_server(proxy_protocol=True)
    assert talk(server.port, data) == door.BAD_HEADER_MESSAGE.encode()
    wait_until(lambda: [r for r in caplog.records if r.levelno == logging.WARNING],
               what="the warning")
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert reason in warning.getMessage() and warning.exc_info is None
    assert not connected_lines(caplog)


def test_a_silent_peer_is_refused_at_the_deadline(start_server, caplog, monkeypatch) -> None:
    monkeypatch.setattr(door, "HEADER_SECONDS", 0.2)
    server = start_server(proxy_protocol=True)
    with connect(server.port) as sock:  # sends nothing, keeps its side open
        assert recv_until_closed(sock) == door.BAD_HEADER_MESSAGE.encode()
    assert any("sin cabecera PROXY completa en 0.2 s" in r.getMessage() for r in caplog.records)


def test_a_stop_ends_a_header_wait_without_a_reply(start_server) -> None:
    server = start_server(proxy_protocol=True)
    with connect(server.port) as sock:  # silent: its thread waits for the header (3 s)
        wait_until(lambda: server.server.active_clients == 1, what="the connection accepted")
        server.server.shutdown()
        assert server.server.close_clients(2.0) == 0  # ended in order, well before 3 s
        assert recv_until_closed(sock) == b""


def test_an_untrusted_peer_is_refused_before_reading(start_server, caplog) -> None:
    server = start_server(proxy_protocol=True,
                          trusted_proxies=pp.parse_networks(["192.0.2.0/24"]))
    assert talk(server.port, v2() + b"hola\n") == door.UNTRUSTED_MESSAGE.encode()
    assert any("no está en --trusted-proxies" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_without_the_setting_a_header_is_just_text(server) -> None:
    assert talk(server.port, v1() + b"hola\n") == v1().upper() + b"HOLA\n"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=fuzz_inputs)
def test_fuzzed_headers_never_crash_hang_or_leak(start_server, data: bytes) -> None:
    server = getattr(start_server, "fuzz_server", None)
    if server is None:  # one server for every example (the fixture is per test)
        server = start_server.fuzz_server = start_server(proxy_protocol=True)
        start_server.baseline = (threading.active_count(), _open_fds())
    reply = talk(server.port, data)
    try:
        header = pp.parse(data)
    except pp.ProxyProtocolError:
        header = None
    if header is None:  # invalid, or incomplete at the end of the stream
        assert reply == door.BAD_HEADER_MESSAGE.encode()
    else:
        protocol = UpperProtocol()
        expected, closed = protocol.feed(header.leftover)
        if not closed:
            expected += protocol.feed_eof()[0]
        assert reply == expected  # the client's bytes, upper-cased; never the header's
    threads, fds = start_server.baseline
    wait_until(lambda: threading.active_count() <= threads and _open_fds() <= fds,
               what="threads and descriptors back to the baseline")


# -- the command line ------------------------------------------------------------------------


def test_settings_switch_and_networks(spawn_server) -> None:
    process = spawn_server("--proxy-protocol", "--trusted-proxies", "127.0.0.1/32,::1")
    assert talk(process.port, v1() + b"hola\n") == b"HOLA\n"
    process.wait_for_log(r"INFO Cliente 203\.0\.113\.7:4242 conectado")
    off = spawn_server(env={"TCP_UPPER_PROXY_PROTOCOL": "no"})
    assert talk(off.port, b"hola\n") == b"HOLA\n"


@pytest.mark.parametrize("value", ["quizá", ""])
def test_bad_proxy_settings_exit_2(tmp_path: Path, value: str) -> None:
    args = [] if value else ["--trusted-proxies", "10.0.0.0/99"]
    env = clean_env(TCP_UPPER_PROXY_PROTOCOL=value) if value else clean_env()
    out = subprocess.run([sys.executable, "-m", "tcp_upper.server", "--port", "0", *args],
                         capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path,
                         env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ("TCP_UPPER_PROXY_PROTOCOL" if value else "--trusted-proxies") in out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_fd_gets_the_bound_port(tmp_path: Path, workers: str) -> None:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "tcp_upper.server", "--host", "127.0.0.1", "--port", "0",
         "--workers", workers, "--ready-fd", str(write_end)],
        pass_fds=(write_end,), cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as ready:
            assert select.select([ready], [], [], DEADLINE)[0], "no port on --ready-fd"
            line = ready.readline()
        assert line.endswith(b"\n")
        assert talk(int(line), b"listo\n") == b"LISTO\n"
    finally:
        process.terminate()
        assert process.wait(DEADLINE) == 0


def test_ready_fd_is_not_in_the_help() -> None:
    out = subprocess.run([sys.executable, "-m", "tcp_upper.server", "--help"],
                         capture_output=True, text=True, timeout=DEADLINE, env=clean_env())
    assert "--proxy-protocol" in out.stdout and "--ready-fd" not in out.stdout
