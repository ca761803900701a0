"""The front of the cluster through a real HAProxy: real client addresses behind it, quiet
health checks, no way around it, TLS.

Marked ``cluster`` and skipped where HAProxy is not installed (helpers from test_cluster.py).
Certificates are made at run time with ``trustme``; no key is stored in the repository.
"""

from __future__ import annotations

import logging
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from conftest import DEADLINE, clean_env, connect, wait_until
from test_cluster import close_all, cluster_test, clusters, open_clients, recv_line

from tcp_upper import cluster as cl


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., cl.Cluster]]:
    with clusters() as make:
        yield make


def _relayed(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    """The instances' relayed log lines (``s1 | ...``) matching *pattern*."""
    regex = re.compile(pattern)
    return [r.getMessage() for r in caplog.records
            if r.name == "tcp_upper.cluster.relay" and regex.search(r.getMessage())]


@cluster_test
def test_instances_log_real_clients_and_checks_only_at_debug(make_cluster, caplog) -> None:
    caplog.set_level(logging.INFO)
    cluster = make_cluster(instances=2, log_level="DEBUG")
    # Checks reach the instances: PROXY v2 LOCAL, logged at DEBUG.
    wait_until(lambda: len(_relayed(caplog, r"DEBUG Cliente \S+ desconectado: DESCONEXION")) >= 4,
               10, "health checks logged at DEBUG")
    clients = open_clients(cluster.front_port, 4, "hola")
    ports = {sock.getsockname()[1] for sock in clients}
    close_all(clients)
    wait_until(lambda: len(_relayed(caplog, r"INFO Cliente .* desconectado")) >= 4, 10,
               "the clients' disconnect lines")
    connected = _relayed(caplog, r"INFO Cliente .* conectado")
    # Exactly our clients, by their own address and port; no check and no HAProxy port.
    logged = {int(re.search(r"Cliente 127\.0\.0\.1:(\d+) conectado", line).group(1))
              for line in connected}
    assert logged == ports and len(connected) == 4, connected


@cluster_test
def test_an_instance_refuses_clients_that_bypass_the_front(make_cluster) -> None:
    cluster = make_cluster(instances=1, log_level="WARNING")
    with connect(cluster.instances[0].port) as sock:
        sock.sendall(b"hola\n")
        assert recv_line(sock).startswith(b"ERROR ")
        assert recv_line(sock) == b""


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A test CA (its certificate file) and the front's PEM (chain + key), made at run time."""
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    front = folder / "front.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(front))
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca_file, front


@cluster_test
def test_tls_end_to_end_through_the_front(make_cluster, tls_files) -> None:
    ca_file, front = tls_files
    cluster = make_cluster(instances=2, tls_cert=str(front), log_level="WARNING")
    context = ssl.create_default_context(cafile=str(ca_file))
    with context.wrap_socket(connect(cluster.front_port), server_hostname="127.0.0.1") as tls:
        assert tls.version() is not None and tls.getpeercert()
        tls.sendall("hola ñandú\nDESCONEXION\n".encode())
        assert recv_line(tls) == "HOLA ÑANDÚ\n".encode()
        assert recv_line(tls) == b""  # the server's orderly close, through TLS


@cluster_test
def test_plain_text_to_the_tls_front_gets_no_reply(make_cluster, tls_files) -> None:
    cluster = make_cluster(instances=1, tls_cert=str(tls_files[1]), log_level="WARNING")
    with connect(cluster.front_port) as sock:
        sock.sendall(b"hola\n")
        try:
            reply = recv_line(sock)
        except ConnectionResetError:
            reply = b""
    assert b"HOLA" not in reply and reply == b""


def _client(port: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m tcp_upper.client`` to the front in one-shot mode, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1", "--port", str(port),
         "--timeout", "5", *args], capture_output=True, text=True, timeout=DEADLINE, cwd=cwd,
        env=clean_env(), stdin=subprocess.DEVNULL)


@cluster_test
def test_the_client_program_speaks_tls_through_the_front(make_cluster, tls_files,
                                                         tmp_path: Path) -> None:
    ca_file, front = tls_files
    cluster = make_cluster(instances=1, tls_cert=str(front), log_level="WARNING")
    done = _client(cluster.front_port, "--cafile", str(ca_file), "hola", "ñandú", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "HOLA ÑANDÚ\n", "")
    # Without the test CA, the front's certificate is refused in one line.
    untrusted = _client(cluster.front_port, "--tls", "hola", cwd=tmp_path)
    assert untrusted.returncode == 1 and untrusted.stdout == ""
    assert untrusted.stderr.count("\n") == 1 and "Traceback" not in untrusted.stderr
    assert "127.0.0.1:" in untrusted.stderr and "certificado" in untrusted.stderr


@cluster_test
def test_the_plain_client_program_to_the_tls_front_fails_in_one_line(make_cluster, tls_files,
                                                                    tmp_path: Path) -> None:
    cluster = make_cluster(instances=1, tls_cert=str(tls_files[1]), log_level="WARNING")
    done = _client(cluster.front_port, "hola", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"127.0.0.1:{cluster.front_port}" in done.stderr
