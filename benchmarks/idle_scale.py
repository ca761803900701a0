"""idle_scale: open N idle connections to a server, check each still answers, then time a few
active clients meanwhile; prints the server's RSS and thread count (from /proc) and round-trip
p50/max.

usage: idle_scale.py PORT SERVER_PID N
"""

import socket
import sys
import time

port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
connect_s = time.perf_counter() - start
# Every idle connection must still be live: ping each once.
start = time.perf_counter()
for sock in socks:
    sock.sendall(b"ping\n")
bad = sum(sock.recv(16) != b"PING\n" for sock in socks)
sweep_s = time.perf_counter() - start
time.sleep(0.5)  # let the server settle before reading its memory
with open(f"/proc/{pid}/status") as status:
    figures = [line.split() for line in status if line.startswith(("VmRSS", "Threads"))]
latencies = []
for sock in socks[:50] * 20:
    start = time.perf_counter()
    sock.sendall(b"hola\n")
    sock.recv(16)
    latencies.append(time.perf_counter() - start)
latencies.sort()
print(f"n={n} connect_s={connect_s:.2f} sweep_s={sweep_s:.2f} bad={bad} "
      + " ".join(name + value for name, value, *_ in figures)
      + f" p50_us={latencies[len(latencies) // 2] * 1e6:.0f} max_us={latencies[-1] * 1e6:.0f}")
