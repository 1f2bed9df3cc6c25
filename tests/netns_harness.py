"""Several machines for real: fsmchat instances, Redis and clients in network namespaces apart.

One session builds four namespaces (``fsm-<pid>-a``, ``-b``, ``-r``, ``-c``) and two networks
between them, as a deployment would have:

- the back network, 10.231.0.0/25: a bridge in ``r`` (Redis's host, 10.231.0.1) with a veth
  port to ``a`` (10.231.0.2) and one to ``b`` (10.231.0.3);
- the front network, 10.231.0.128/25: a bridge in ``c`` (the clients' host, 10.231.0.129) with a
  veth port to ``a`` (10.231.0.130) and one to ``b`` (10.231.0.131).

So a client reaches the instances and not Redis, and an instance's link to Redis can be cut
(``cut``: its back veth down) while its clients stay connected. Every device is made inside the
namespaces, nothing in the host's: the addresses cannot clash with the host's networks, nor with
another session's (whose namespaces are others). Namespaces left by a session that died are
deleted at the next one's start (their PID is gone), after the processes left in them.

Processes run under ``ip netns exec NS``, which execs the command: the PID we hold is the
process's, killed by it at teardown. A socket's namespace is the one it was made in: a helper
process in a namespace makes sockets there and passes them back over a Unix socket
(SCM_RIGHTS), so the test's own threads connect and read them like any other socket (Python
3.11 has no ``os.setns``).

Test modules load the fixtures with ``pytest_plugins = ["netns_harness"]``. Without root, ``ip``
or ``ip netns add`` that works, the tests skip, with the reason, found once per session.
PYTEST_DONT_REWRITE (imported first, as redis_harness).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import WAIT, ServerProcess
from redis_harness import RedisServer

NAMES = ("a", "b", "r", "c")
"""The namespaces: two instances, Redis, the clients."""

BACK = {"r": "10.231.0.1", "a": "10.231.0.2", "b": "10.231.0.3"}
FRONT = {"c": "10.231.0.129", "a": "10.231.0.130", "b": "10.231.0.131"}
PREFIX = 25
REDIS_PORT = 6379
INSTANCES = ("a", "b")

_STALE = re.compile(r"^fsm-(\d+)-[abrc]$")

_MAKER = """
import socket, sys
chan = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=int(sys.argv[1]))
while chan.recv(1):
    made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    socket.send_fds(chan, [b"s"], [made.fileno()])
    made.close()
"""
"""Runs in a namespace: one TCP socket made there per byte asked, passed back."""


def ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure says what it ran and what ip said."""
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=WAIT)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


class SocketMaker:
    """A helper process in one namespace that makes TCP sockets there for the test."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lock = threading.Lock()
        with theirs:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-I", "-c", _MAKER,
                 str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )
        self.chan.settimeout(WAIT)

    def make(self) -> socket.socket:
        """A new, unconnected TCP socket of this namespace."""
        with self.lock:
            self.chan.sendall(b"s")
            _, fds, _, _ = socket.recv_fds(self.chan, 1, 1)
        assert len(fds) == 1, f"the socket maker in {self.namespace} sent {fds}"
        return socket.socket(fileno=fds[0])

    def connect(self, host: str, port: int) -> socket.socket:
        """A socket of this namespace connected to ``host:port`` (timeout WAIT)."""
        sock = self.make()
        sock.settimeout(WAIT)
        try:
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self.chan.close()  # its end of file: the helper ends
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)


class Network:
    """The four namespaces and their two networks, for one test session."""

    def __init__(self) -> None:
        self.tag = f"fsm-{os.getpid()}"
        self.made: list[str] = []
        self.makers: dict[str, SocketMaker] = {}

    def ns(self, name: str) -> str:
        """The namespace's real name: ``ns("a")`` is ``fsm-<pid>-a``."""
        return f"{self.tag}-{name}"

    def build(self) -> None:
        for name in NAMES:
            ip("netns", "add", self.ns(name))
            self.made.append(self.ns(name))
            ip("-n", self.ns(name), "link", "set", "lo", "up")
        for hub, network, device in (("r", BACK, "back"), ("c", FRONT, "front")):
            ns = self.ns(hub)
            ip("-n", ns, "link", "add", "br0", "type", "bridge")
            ip("-n", ns, "addr", "add", f"{network[hub]}/{PREFIX}", "dev", "br0")
            ip("-n", ns, "link", "set", "br0", "up")
            for name in INSTANCES:  # the instance's ``device``, the hub's port named after it
                ip("-n", self.ns(name), "link", "add", device, "type", "veth",
                   "peer", "name", name, "netns", ns)
                ip("-n", ns, "link", "set", "dev", name, "master", "br0")
                ip("-n", ns, "link", "set", "dev", name, "up")
                ip("-n", self.ns(name), "addr", "add", f"{network[name]}/{PREFIX}", "dev", device)
                ip("-n", self.ns(name), "link", "set", device, "up")

    def maker(self, name: str) -> SocketMaker:
        """The socket maker of namespace ``name`` (started the first time it is asked for)."""
        if name not in self.makers:
            self.makers[name] = SocketMaker(self.ns(name))
        return self.makers[name]

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def set_back(self, name: str, up: bool) -> None:
        """Instance ``name``'s link to the back network (to Redis) up or down."""
        ip("-n", self.ns(name), "link", "set", "back", "up" if up else "down")

    def close(self) -> None:
        for maker in self.makers.values():
            maker.close()
        self.makers.clear()
        for ns in reversed(self.made):  # its devices go with it
            with contextlib.suppress(AssertionError):
                ip("netns", "delete", ns)
        self.made.clear()


def _delete_stale() -> None:
    """Namespaces of ours whose session died without its teardown."""
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True,
                            text=True, timeout=WAIT).stdout
    for line in listed.splitlines():
        name = line.split(" ", 1)[0]
        found = _STALE.match(name)
        if found is None or int(found[1]) == os.getpid():
            continue
        try:
            os.kill(int(found[1]), 0)
        except ProcessLookupError:  # its processes outlived it: they go first, by PID
            pids = subprocess.run(["ip", "netns", "pids", name], check=False,
                                  capture_output=True, text=True, timeout=WAIT).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True,
                           timeout=WAIT)
        except PermissionError:  # alive, someone else's
            pass


def _cannot() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs these tests as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian: apt-get install iproute2)"
    return None


@pytest.fixture(scope="session")
def netns_network() -> Iterator[Network]:
    """The namespaces and networks, built once per session (or the session's skip reason)."""
    reason = _cannot()
    if reason is not None:
        pytest.skip(reason)
    _delete_stale()
    network = Network()
    try:
        ip("netns", "add", network.ns(NAMES[0]))
    except AssertionError as exc:
        pytest.skip(f"cannot make a network namespace: {exc}")
    ip("netns", "delete", network.ns(NAMES[0]))
    try:
        network.build()
        yield network
    finally:
        network.close()


class NetnsInstance(ServerProcess):
    """An fsmchat in its own namespace; ``connect`` comes from the clients' namespace."""

    def __init__(self, args: Sequence[str], network: Network, name: str) -> None:
        super().__init__(args, prefix=network.exec_prefix(name))
        self.name = name
        self.address = FRONT[name]
        self.clients = network.maker("c")

    def raw_connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = self.clients.make()
        self._clients.append(sock)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(WAIT)
        sock.connect((self.address, self.port))
        return sock


@dataclass
class Hosts:
    """One test's view: Redis running in ``r``, instances started on demand in ``a`` and ``b``."""

    network: Network
    redis: RedisServer
    instances: list[NetnsInstance]
    cut_links: set[str]

    def start_instance(self, name: str, *extra: str) -> NetnsInstance:
        """``python -m fsmchat`` in namespace ``name`` ("a" or "b") on Redis, once started."""
        assert name in INSTANCES, name
        args = ["--host", FRONT[name], "--port", "0", "--redis", self.redis.url,
                "--log-format", "json", *extra]
        server = NetnsInstance(args, self.network, name)
        self.instances.append(server)
        server.port = int(server.wait_event("server.started")["port"])
        return server

    def cut(self, name: str) -> None:
        """Instance ``name`` loses its link to Redis (no FIN, no RST: the cable is out)."""
        self.network.set_back(name, up=False)
        self.cut_links.add(name)

    def restore(self, name: str) -> None:
        self.network.set_back(name, up=True)
        self.cut_links.discard(name)


@pytest.fixture
def hosts(netns_network: Network, tmp_path: Path) -> Iterator[Hosts]:
    """A Redis in its namespace for this test; at teardown every process is killed by its PID,
    cut links are restored, and no instance may have logged a ``lifecycle.bug``."""
    maker = netns_network.maker("r")
    # Protected mode takes only loopback clients without a password: here every client comes
    # over the private back network, which nothing outside these namespaces reaches.
    redis = RedisServer(tmp_path / "redis", REDIS_PORT, ("--protected-mode", "no"), host=BACK["r"],
                        prefix=netns_network.exec_prefix("r"), dial=maker.connect)
    view = Hosts(netns_network, redis, [], set())
    try:
        redis.start()
        yield view
    finally:
        for server in view.instances:
            server.close()
        redis.close()
        for name in list(view.cut_links):
            view.restore(name)
    bugs = [(s.args, e) for s in view.instances for e in s.events("lifecycle.bug")]
    assert not bugs, f"lifecycle.bug logged: {bugs[:3]}"
