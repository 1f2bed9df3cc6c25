"""A broadcast chat relay as a Twisted user writes it: a Protocol, a Factory holding the clients.

    python bench/peers/twisted_relay.py --port 8080

``dataReceived`` writes the data to the transport of every other client. Runs on Twisted's
default reactor (epoll on Linux). Listens on 127.0.0.1 only; prints one JSON line
``{"event": "server.started", "port": N, ...}`` once bound.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import cast

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IAddress
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class Relay(Protocol):
    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.setTcpNoDelay(True)
        self.factory.clients.add(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.clients.discard(self)

    def dataReceived(self, data: bytes) -> None:
        for client in self.factory.clients:
            if client is not self and client.transport is not None:
                client.transport.write(data)


class RelayFactory(Factory):
    def __init__(self) -> None:
        self.clients: set[Relay] = set()

    def buildProtocol(self, addr: IAddress | None) -> Relay:
        return Relay(self)


def main() -> None:
    parser = argparse.ArgumentParser(description="Twisted Protocol/Factory broadcast relay")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    port = parser.parse_args().port
    reactor = cast(PosixReactorBase, _reactor)  # the default reactor on Linux is epoll
    listening = reactor.listenTCP(  # type: ignore[no-untyped-call]
        port, RelayFactory(), interface="127.0.0.1")
    bound: int = listening.getHost().port
    print(json.dumps({"event": "server.started", "port": bound, "pid": os.getpid()}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
