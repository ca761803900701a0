"""The client over TLS (``--tls``, ``--cafile``, ``--tls-insecure``, ``UpperClient(ssl_context=)``).

The server stays plain: a TLS front made for the test (asyncio, in a thread) takes the TLS
connections and forwards their bytes to a real in-process server, as a TLS-terminating proxy
would. Its certificate comes from a CA that trustme makes at run time; no key is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEADLINE, clean_env

from tcp_upper.client import UpperClient, client_ssl_context
from tcp_upper.errors import UpperClientError

trustme = pytest.importorskip("trustme")


class TlsFront:
    """Accepts TLS on 127.0.0.1 (port chosen by the kernel) and relays to *backend_port*."""

    def __init__(self, backend_port: int, context: ssl.SSLContext) -> None:
        self.backend_port = backend_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context), self.loop
        ).result(DEADLINE)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        back_reader, back_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        await asyncio.gather(self._relay(reader, back_writer), self._relay(back_reader, writer))

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # the client's half-close reaches the server
                return
        writer.close()  # TLS has no half-close: the server closed, so close the client

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_front(server, ca) -> Iterator[TlsFront]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    front = TlsFront(server.port, context)
    yield front
    front.stop()


@pytest.fixture
def ca_file(ca, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"  # the CA's certificate only: public
    ca.cert_pem.write_to_path(str(path))
    return path


def run_client(*args: str, cwd: Path, stdin: str = "", **env: str,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcp_upper.client", "--host", "127.0.0.1", *args], input=stdin,
        capture_output=True, text=True, encoding="utf-8", cwd=cwd, env=clean_env(**env),
        timeout=DEADLINE,
    )


def test_upper_client_over_tls_with_a_long_line(tls_front, ca_file):
    context = client_ssl_context(cafile=str(ca_file))
    line = "tls " * (2 * 1024 * 1024)  # 8 MiB: both directions at once through TLS
    with UpperClient("127.0.0.1", tls_front.port, DEADLINE, ssl_context=context) as client:
        assert client.send("hola servidor") == "HOLA SERVIDOR"
        assert client.send(line) == line.upper()
        assert client.send("sigue") == "SIGUE"


def test_one_shot_with_cafile(tls_front, ca_file, tmp_path):
    result = run_client("--port", str(tls_front.port), "--cafile", str(ca_file), "hola",
                        cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "HOLA\n", "")


def test_tls_settings_from_the_environment(tls_front, ca_file, tmp_path):
    result = run_client("--port", str(tls_front.port), cwd=tmp_path,
                        stdin="hola servidor\nDESCONEXION\n", TCP_UPPER_TLS="sí",
                        TCP_UPPER_CAFILE=str(ca_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["Cliente envía: hola servidor",
                                              "Servidor responde: HOLA SERVIDOR"]


def test_tls_insecure_skips_verification(tls_front, tmp_path):
    result = run_client("--port", str(tls_front.port), "--tls-insecure", "hola", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "HOLA\n")


def one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


def test_untrusted_certificate_is_one_line(tls_front, tmp_path):
    # The system's CAs do not know the test CA.
    line = one_error_line(run_client("--port", str(tls_front.port), "--tls", "hola",
                                     cwd=tmp_path), 1)
    assert line.startswith(f"tcp-upper-client: error: no se puede conectar por TLS con "
                           f"127.0.0.1:{tls_front.port}: el certificado del servidor no es de "
                           "confianza")


def test_tls_to_a_plain_server_is_one_line(server, tmp_path):
    line = one_error_line(run_client("--port", str(server.port), "--tls", "hola",
                                     cwd=tmp_path), 1)
    assert f"TLS con 127.0.0.1:{server.port}" in line


def test_upper_client_tls_error_is_an_upper_client_error(server, ca_file):
    with pytest.raises(UpperClientError) as caught:
        UpperClient("127.0.0.1", server.port, DEADLINE,
                    ssl_context=client_ssl_context(cafile=str(ca_file)))
    assert f"127.0.0.1:{server.port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, ssl.SSLError)


@pytest.mark.parametrize("content", [None, "no es un certificado\n"])
def test_bad_cafile_exits_2(content, tmp_path):
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    line = one_error_line(run_client("--port", "1", "--cafile", str(path), "hola",
                                     cwd=tmp_path), 2)
    assert line.startswith("tcp-upper-client: error: no se puede cargar la CA de --cafile")
    assert str(path) in line
