from conftest import connect, recv_exactly


def test_fixtures_work(server, spawn_server):
    with connect(server.port) as sock:
        sock.sendall(b"hola\n")
        assert recv_exactly(sock, 5) == b"HOLA\n"
    proc = spawn_server()
    with connect(proc.port) as sock:
        sock.sendall(b"hola")
        assert recv_exactly(sock, 4) == b"HOLA"
    proc.signal()
    assert proc.wait() == 0
    assert "Servidor parado" in proc.log
