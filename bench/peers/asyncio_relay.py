"""A broadcast chat relay as an asyncio user writes it: streams, a set of writers, drain.

    python bench/peers/asyncio_relay.py --port 8080

Each client's ``reader.read(65536)`` is written to every other client, followed by ``await
drain()`` for that client, the pattern the asyncio documentation teaches. Listens on 127.0.0.1
only; prints one JSON line ``{"event": "server.started", "port": N, ...}`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

clients: set[asyncio.StreamWriter] = set()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    clients.add(writer)
    try:
        while data := await reader.read(65536):
            for other in list(clients):
                if other is not writer:
                    try:
                        other.write(data)
                        await other.drain()
                    except ConnectionError:
                        clients.discard(other)
    except ConnectionError:
        pass
    finally:
        clients.discard(writer)
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "server.started", "port": bound, "pid": os.getpid()}), flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="asyncio streams broadcast relay")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
