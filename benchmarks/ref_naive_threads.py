"""The typical socketserver solution: readline + write per line, defaults left as they are.

usage: ref_naive_threads.py PORT
"""

import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"DESCONEXION":
                break
            self.wfile.write(line.decode().upper().encode())


socketserver.ThreadingTCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Handler) as server:
    server.serve_forever()
