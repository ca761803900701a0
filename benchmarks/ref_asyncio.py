"""asyncio streams upper-case line server: what a Python developer would write instead.

usage: ref_asyncio.py PORT [uvloop]
"""

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"DESCONEXION":
            break
        writer.write(line.decode().upper().encode())
        await writer.drain()
    writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if len(sys.argv) > 2 and sys.argv[2] == "uvloop":
    import uvloop

    uvloop.install()
asyncio.run(main(int(sys.argv[1])))
