"""--reuse-port: several instances listen on one port, the kernel spreads the clients over them,
and Redis makes their separate client sets one chat.

The clients are plain non-blocking sockets driven by one ``selectors`` loop in the test process
(thousands of them: threads per client would cost more than the servers).
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import (
    HOST,
    WAIT,
    Event,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    run_cli,
)
from redis_harness import RedisServer, bug_free

pytest_plugins = ["redis_harness"]

INSTANCES = 3
CLIENTS = 2500
SENDERS = 10
#: Every message has this size, so a client's stream splits back into messages.
SIZE = 64
#: Connects in flight at once (well under each listener's backlog).
BATCH = 250


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    """conftest's factory, checked at teardown: no instance logged a lifecycle.bug."""
    yield from bug_free(start_server)


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """The soft RLIMIT_NOFILE at the hard limit for this test (thousands of client sockets).

    Restored afterwards, so that the other tests' servers inherit the usual limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one for descriptors: ask for plenty instead.
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * CLIENTS)
    if wanted < CLIENTS + 500:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is too low for {CLIENTS} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_total(
    servers: list[ServerProcess], name: str, total: int, timeout: float = WAIT
) -> list[int]:
    """Wait until ``name`` events, summed over ``servers``, reach ``total``; return the counts.

    Each server's log has its own condition, so one waiter thread per server counts that
    server's events as they come; whichever logs the last one sees the sum reach ``total``.
    """
    counts = [0] * len(servers)
    lock = threading.Lock()
    done = threading.Event()

    def watch(index: int) -> None:
        def feed(event: Event) -> bool:
            if done.is_set():
                return True
            if event.get("event") != name:
                return False
            with lock:
                counts[index] += 1
                reached = sum(counts) >= total
            if reached:
                done.set()
            return reached

        try:
            servers[index].wait_for(feed, timeout, f"{total} {name} over all instances")
        except AssertionError:  # timed out or the server ended: the main thread reports it
            return

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    reached = done.wait(timeout)
    with lock:
        final = list(counts)
    assert reached, f"{name}: {final} (sum {sum(final)}) of {total} within {timeout}s"
    return final


def connect_all(port: int, count: int) -> list[socket.socket]:
    """``count`` non-blocking connects to ``port``, ``BATCH`` in flight at a time."""
    socks: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        while len(socks) < count:
            for _ in range(min(BATCH, count - len(socks))):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setblocking(False)
                err = sock.connect_ex((HOST, port))
                assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err, err)
                selector.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + WAIT
            while selector.get_map():
                ready = selector.select(max(0.0, deadline - time.monotonic()))
                assert ready, f"{len(selector.get_map())} connects still pending after {WAIT}s"
                for key, _ in ready:
                    done = key.fileobj
                    assert isinstance(done, socket.socket)
                    err = done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert err == 0, f"connect failed: {errno.errorcode.get(err, err)}"
                    selector.unregister(done)
    return socks


def receive_all(socks: list[socket.socket], expected: list[int], timeout: float) -> list[bytes]:
    """Read until each socket got exactly ``expected[i]`` bytes (more is an error)."""
    buffers = [bytearray() for _ in socks]
    index = {sock.fileno(): i for i, sock in enumerate(socks)}
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            if expected[i]:
                selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.get_map():
            remaining = deadline - time.monotonic()
            ready = selector.select(max(0.0, remaining))
            if not ready:
                short = [i for i, buf in enumerate(buffers) if len(buf) < expected[i]]
                raise AssertionError(
                    f"{len(short)} clients still short after {timeout}s, e.g. client {short[0]}: "
                    f"{len(buffers[short[0]])} of {expected[short[0]]} bytes"
                )
            for key, _ in ready:
                readable = key.fileobj
                assert isinstance(readable, socket.socket)
                i = index[readable.fileno()]
                chunk = readable.recv(65536)
                assert chunk, f"client {i}: EOF after {len(buffers[i])} bytes"
                buffers[i] += chunk
                assert len(buffers[i]) <= expected[i], (
                    f"client {i}: {len(buffers[i])} bytes, expected {expected[i]}: duplicates?"
                )
                if len(buffers[i]) == expected[i]:
                    selector.unregister(readable)
    return [bytes(buf) for buf in buffers]


def test_instances_on_one_port_share_the_clients_and_one_chat(
    start_server: StartServer,
    redis_server: RedisServer,
    many_descriptors: None,
    listen_port: int,
) -> None:
    """The point of --reuse-port with Redis: scale out on one address, still one chat."""
    port = listen_port
    servers: list[ServerProcess] = []
    for _ in range(INSTANCES):
        server = start_server(
            "--host", HOST, "--port", str(port), "--reuse-port", "--redis", redis_server.url,
            "--log-level", "info", "--max-clients-per-addr", "0", started=False,
        )  # every client comes from 127.0.0.1: no per-address limit
        assert server.port == port, server.describe()
        servers.append(server)
    for server in servers:
        for link in ("publish", "subscribe"):
            server.wait_event("redis.connected", link=link)

    socks = connect_all(port, CLIENTS)
    try:
        counts = wait_total(servers, "connection.accepted", CLIENTS, timeout=30)
        assert sum(counts) == CLIENTS
        assert all(counts), f"an instance got no client: {counts}"
        assert not [e for s in servers for e in s.events("connection.rejected")]

        # Which instance serves which client: by the client's own address.
        home: dict[str, int] = {}
        for k, server in enumerate(servers):
            for event in server.events("connection.accepted"):
                assert event["peer"] not in home, f"{event['peer']} accepted twice"
                home[event["peer"]] = k
        peers = ["{}:{}".format(*sock.getsockname()[:2]) for sock in socks]
        assert sorted(home) == sorted(peers)

        # Senders spread over the instances, each sends one message, all at once.
        by_instance = [[i for i, p in enumerate(peers) if home[p] == k] for k in range(INSTANCES)]
        senders = [by_instance[n % INSTANCES][n // INSTANCES] for n in range(SENDERS)]
        messages = {
            i: f"message {n:02d} from client {i} on instance {home[peers[i]]} ".encode().ljust(
                SIZE, b"#")
            for n, i in enumerate(senders)
        }
        for i, message in messages.items():
            assert socks[i].send(message) == SIZE
        expected = [SIZE * (len(messages) - (i in messages)) for i in range(CLIENTS)]
        streams = receive_all(socks, expected, timeout=30)

        wrong = []
        for i, stream in enumerate(streams):
            got = sorted(stream[k : k + SIZE] for k in range(0, len(stream), SIZE))
            want = sorted(m for j, m in messages.items() if j != i)
            if got != want:
                wrong.append(i)
        assert not wrong, f"{len(wrong)} clients got the wrong messages, e.g. client {wrong[0]}"

        # Exactly once: a last message, sent after all of the above arrived, is the next thing
        # every other client reads (a late duplicate would come first), and its sender reads
        # nothing.
        last_sender = senders[0]
        last = b"the last word".ljust(SIZE, b"!")
        assert socks[last_sender].send(last) == SIZE
        tail = [0 if i == last_sender else SIZE for i in range(CLIENTS)]
        assert all(s == last for i, s in enumerate(receive_all(socks, tail, 30)) if tail[i])
        socks[last_sender].setblocking(True)
        assert_nothing_arrives(socks[last_sender])
        for server in servers:
            assert server.proc.poll() is None, server.describe()
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("first_reuses", [False, True], ids=["plain-first", "reuse-first"])
def test_without_reuse_port_a_second_instance_cannot_bind(
    start_server: StartServer, first_reuses: bool, listen_port: int
) -> None:
    """Sharing a port must be asked for by every instance; otherwise the port is taken."""
    port = listen_port
    first = start_server(
        "--host", HOST, "--port", str(port), *(["--reuse-port"] if first_reuses else []),
        started=False,
    )
    assert first.port == port
    result = run_cli("--host", HOST, "--port", str(port))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [e for e in events if e["event"] == "server.failed"]
    assert len(failed) == 1, events
    assert failed[0]["port"] == port
    assert not [e for e in events if e["event"] == "server.started"]
    assert first.proc.poll() is None
