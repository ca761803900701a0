"""asyncio Protocol upper-case server (chunk-wise, the fastest pure-asyncio shape).

usage: ref_asyncio_proto.py PORT [uvloop]
"""

import asyncio
import sys


class Upper(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        text = data.decode("utf-8", "surrogateescape")
        self.transport.write(text.upper().encode("utf-8", "surrogateescape"))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upper, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if len(sys.argv) > 2 and sys.argv[2] == "uvloop":
    import uvloop

    uvloop.install()
asyncio.run(main(int(sys.argv[1])))
