"""The textbook ``select`` broadcast relay: per-client lists of pending messages, no batching.

    python bench/peers/select_relay.py --port 8080

What one ``recv`` returns is appended to the pending list of every other client; a writable
client gets one ``send`` of its oldest pending message per ``select`` turn. Listens on 127.0.0.1
only; prints one JSON line ``{"event": "server.started", "port": N, ...}`` once bound.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket


class Relay:
    def __init__(self, server: socket.socket) -> None:
        self.server = server
        self.inputs: list[socket.socket] = [server]
        self.outputs: list[socket.socket] = []
        self.pending: dict[socket.socket, list[bytes]] = {}

    def drop(self, sock: socket.socket) -> None:
        self.inputs.remove(sock)
        if sock in self.outputs:
            self.outputs.remove(sock)
        del self.pending[sock]
        sock.close()

    def accept(self) -> None:
        try:
            client, _ = self.server.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delays
        self.inputs.append(client)
        self.pending[client] = []

    def receive(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.drop(sock)
            return
        for other, queue in self.pending.items():
            if other is not sock:
                queue.append(data)
                if other not in self.outputs:
                    self.outputs.append(other)

    def send(self, sock: socket.socket) -> None:
        queue = self.pending.get(sock)
        if not queue:
            return
        try:
            sent = sock.send(queue[0])
        except BlockingIOError:
            return
        except OSError:
            self.drop(sock)
            return
        if sent < len(queue[0]):
            queue[0] = queue[0][sent:]
        else:
            queue.pop(0)
        if not queue:
            self.outputs.remove(sock)

    def serve_forever(self) -> None:
        while True:
            readable, writable, _ = select.select(self.inputs, self.outputs, [])
            for sock in readable:
                if sock is self.server:
                    self.accept()
                elif sock in self.pending:  # not dropped earlier in this turn
                    self.receive(sock)
            for sock in writable:
                self.send(sock)


def main() -> None:
    parser = argparse.ArgumentParser(description="textbook select() broadcast relay")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    port = parser.parse_args().port
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    server.setblocking(False)
    bound = server.getsockname()[1]
    print(json.dumps({"event": "server.started", "port": bound, "pid": os.getpid()}), flush=True)
    Relay(server).serve_forever()


if __name__ == "__main__":
    main()
