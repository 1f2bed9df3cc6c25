"""Metrics over HTTP (``--metrics-port``): Prometheus text served by the chat's own loop.

Scrapes go through urllib / http.client (and a raw socket for what a library would not send);
the text is parsed with prometheus_client's own parser, and every number is checked against the
traffic the test made.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from chat_harness import join_many
from conftest import (
    HOST,
    WAIT,
    ServerProcess,
    StartServer,
    closed_by_server,
    free_port,
    recv_exactly,
    recv_until,
    recv_until_eof,
    run_cli,
    send_messages,
    usage_error,
    wait_event_count,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fsmchat.net.http import REQUEST_TIMEOUT
from fsmchat.ops.metrics import CATALOGUE
from fsmchat.ops.metrics_http import MAX_SCRAPERS

METRICS = ("--metrics-port", "0")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("accepted", "handshaking", "reading", "paused", "limited", "emptied", "draining")
LOCAL_CATALOGUE = {spec.name: spec for spec in CATALOGUE if "redis" not in spec.name}


def metrics_port(server: ServerProcess) -> int:
    port = server.events("server.started")[0]["metrics_port"]
    assert isinstance(port, int) and 0 < port < 65536, port
    return port


def url(server: ServerProcess, path: str = "/metrics") -> str:
    return f"http://{HOST}:{metrics_port(server)}{path}"


class Scrape:
    """One parsed ``GET /metrics``: families by name (counters without ``_total``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def samples(self, family: str) -> list[Sample]:
        assert family in self.families, f"no {family} in the scrape:\n{self.text}"
        return list(self.families[family].samples)

    def value(self, name: str, **labels: str) -> float:
        """The one sample called ``name`` (``_total`` included for counters) with ``labels``."""
        family = name.removesuffix("_total")
        found = [
            s.value for s in self.samples(family) if s.name == name and s.labels == labels
        ]
        assert len(found) == 1, f"{len(found)} samples {name}{labels} in:\n{self.text}"
        return found[0]

    def by_label(self, name: str, label: str) -> dict[str, float]:
        family = name.removesuffix("_total")
        return {s.labels[label]: s.value for s in self.samples(family) if s.name == name}


def scrape(server: ServerProcess) -> Scrape:
    with urllib.request.urlopen(url(server), timeout=WAIT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        body: bytes = response.read()
    return Scrape(body.decode())


def http_status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), response[:200]
    return int(line.split()[1])


# --------------------------------------------------------------------------
# What is counted
# --------------------------------------------------------------------------


def test_metrics_count_the_traffic(start_server: StartServer) -> None:
    before = time.time()
    server = start_server(*METRICS, "--history", "3", "--max-clients", "3")
    after = time.time()
    a, b, c = server.connect_many(3)
    server.raw_connect()
    server.wait_event("connection.rejected", reason="server_full")
    messages = [os.urandom(size) for size in (3, 30, 300, 3000, 7)]
    sent = send_messages(server, a, messages)
    for reader in (b, c):
        assert recv_exactly(reader.sock, sent) == b"".join(messages)
        server.wait_sent_to(reader, sent)
    c.sock.close()
    assert server.wait_closed(c)["reason"] == "peer_closed"

    first = scrape(server)
    second = scrape(server)  # scrapes are no clients: they change no client numbers
    for metrics in (first, second):
        assert metrics.value("fsmchat_connections_accepted_total") == 3
        states = metrics.by_label("fsmchat_connections", "state")
        assert set(states) == set(STATES), states
        assert states == {state: (2 if state == "reading" else 0) for state in STATES}
        closed = {k: v for k, v in metrics.by_label(
            "fsmchat_connections_closed_total", "reason").items() if v}
        assert closed == {"peer_closed": 1}
        rejected = {k: v for k, v in metrics.by_label(
            "fsmchat_connections_rejected_total", "reason").items() if v}
        assert rejected == {"server_full": 1}
        assert metrics.value("fsmchat_messages_received_total") == len(messages)
        assert metrics.value("fsmchat_messages_delivered_total") == 2 * len(messages)
        assert metrics.value("fsmchat_received_bytes_total") == sent
        assert metrics.value("fsmchat_sent_bytes_total") == 2 * sent
        assert metrics.value("fsmchat_queued_bytes") == 0
        assert metrics.value("fsmchat_queued_bytes_max") == 0
        assert metrics.value("fsmchat_lines_cut_total") == 0
        assert metrics.value("fsmchat_history_messages") == 3
        assert metrics.value("fsmchat_loop_iterations_total") > 0
        start = metrics.value("fsmchat_start_time_seconds")
        assert before - 1 <= start <= after + 1, (before, start, after)
        waited = metrics.value("fsmchat_select_seconds_total")
        assert 0 <= waited <= time.time() - before
    assert second.value("fsmchat_loop_iterations_total") > first.value(
        "fsmchat_loop_iterations_total")


def test_chat_lines_cut_are_counted(start_server: StartServer) -> None:
    server = start_server(*METRICS, "--mode", "chat", "--max-line", "16")
    a, b = join_many(server, 2)
    a.say("c" * 33)
    b.expect(*[f"<user1> {'c' * n}\n" for n in (16, 16, 1)])
    server.wait_sent_to(b.client, b.lines.received)
    metrics = scrape(server)
    assert metrics.value("fsmchat_lines_cut_total") == 1
    assert metrics.value("fsmchat_messages_delivered_total") == a.lines.count + b.lines.count
    assert metrics.value("fsmchat_sent_bytes_total") == a.lines.received + b.lines.received


def test_every_metric_is_in_the_catalogue_and_every_local_one_is_served(
    start_server: StartServer,
) -> None:
    server = start_server(*METRICS, "--max-clients", "2")
    a, b = server.connect_many(2)
    server.raw_connect()
    server.wait_event("connection.rejected")
    b.sock.close()
    server.wait_closed(b)
    metrics = scrape(server)
    assert set(metrics.families) == set(LOCAL_CATALOGUE), metrics.text
    for name, family in metrics.families.items():
        spec = LOCAL_CATALOGUE[name]
        assert family.type == spec.kind, name
        assert family.documentation == spec.help, name
        assert family.samples, name
        for sample in family.samples:
            expected = {spec.label} if spec.label else set()
            assert set(sample.labels) == expected, (name, sample)
            assert sample.name == (name + "_total" if spec.kind == "counter" else name)
    a.sock.sendall(b"ok")  # the chat itself is still fine
    server.wait_received_from(a, 2)


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


def test_started_event_names_the_mode_and_the_metrics_port(start_server: StartServer) -> None:
    plain = start_server()
    assert "metrics_port" not in plain.events("server.started")[0]
    server = start_server(*METRICS)
    started = server.events("server.started")[0]
    assert started["mode"] == "raw"
    assert metrics_port(server) != server.port
    # The port is really the metrics listener.
    with urllib.request.urlopen(url(server), timeout=WAIT) as response:
        assert response.status == 200


def test_head_answers_200_without_a_body(start_server: StartServer) -> None:
    server = start_server(*METRICS)
    with socket.create_connection((HOST, metrics_port(server)), timeout=WAIT) as sock:
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        response = recv_until_eof(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert http_status_of(response) == 200
    assert f"content-type: {CONTENT_TYPE}".encode() in head.lower()
    assert body == b""


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/x", "/favicon.ico"])
def test_other_paths_are_404(start_server: StartServer, path: str) -> None:
    server = start_server(*METRICS)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url(server, path), timeout=WAIT)
    assert caught.value.code == 404
    caught.value.close()
    event = server.wait_event("http.request", target=path)
    assert (event["method"], event["status"], event["level"]) == ("GET", 404, "debug")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_on_metrics_are_405_with_allow(
    start_server: StartServer, method: str
) -> None:
    server = start_server(*METRICS)
    connection = http.client.HTTPConnection(HOST, metrics_port(server), timeout=WAIT)
    try:
        connection.request(method, "/metrics", body=b"x=1")
        response = connection.getresponse()
        response.read()
        assert response.status == 405
        assert response.getheader("Allow") == "GET, HEAD"
    finally:
        connection.close()
    event = server.wait_event("http.request", method=method)
    assert (event["target"], event["status"]) == ("/metrics", 405)


def test_keep_alive_serves_several_requests_on_one_connection(start_server: StartServer) -> None:
    server = start_server(*METRICS)
    a, b = server.connect_many(2)
    connection = http.client.HTTPConnection(HOST, metrics_port(server), timeout=WAIT)
    try:
        local: list[object] = []
        delivered = 0
        for sent in (b"one", b"three"):
            a.sock.sendall(sent)
            assert recv_exactly(b.sock, len(sent)) == sent
            delivered += len(sent)
            server.wait_sent_to(b, delivered)
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type") == CONTENT_TYPE
            metrics = Scrape(response.read().decode())
            assert connection.sock is not None, "the server closed a keep-alive connection"
            local.append(connection.sock.getsockname())
            assert metrics.value("fsmchat_received_bytes_total") == server.bytes_received_from(a)
        assert local[0] == local[1], "the second request went over a new connection"
    finally:
        connection.close()
    requests = wait_event_count(server, "http.request", 2)
    assert requests[0]["fd"] == requests[1]["fd"]
    assert [(r["method"], r["target"], r["status"]) for r in requests] == [
        ("GET", "/metrics", 200)
    ] * 2


def test_a_malformed_request_gets_400_and_is_closed_while_the_chat_goes_on(
    start_server: StartServer,
) -> None:
    server = start_server(*METRICS, "--mode", "chat")
    a, b = join_many(server, 2)
    a.say("before")
    b.expect("<user1> before\n")
    with socket.create_connection((HOST, metrics_port(server)), timeout=WAIT) as bad:
        bad.sendall(b"garbage that is")  # no verdict possible before the line ends
        a.say("during")  # a half-sent bad request holds nobody up
        b.expect("<user1> during\n")
        bad.sendall(b" not HTTP at all\r\n\r\n")
        response = recv_until(
            bad, lambda buf: b"\r\n\r\n" in buf, "a response head", eof_ends=True
        )
        assert http_status_of(response) == 400
        rest = recv_until_eof(bad)  # the server closes it
        assert b"HTTP/1.1" not in rest
        peer = "{}:{}".format(*bad.getsockname()[:2])
    warning = server.wait_event("http.bad_request", peer=peer)
    assert warning["level"] == "warning"
    assert isinstance(warning["error"], str) and warning["error"]
    b.say("after")
    a.expect("<user2> after\n")
    # And the metrics listener still serves.
    assert scrape(server).value("fsmchat_connections_accepted_total") == 2
    a.quiet()
    b.quiet()


# --------------------------------------------------------------------------
# Slow and stuck scrapers
# --------------------------------------------------------------------------

PARTIAL = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # the blank line that ends it never comes


def test_a_connection_without_a_whole_request_is_closed_after_a_few_seconds(
    start_server: StartServer,
) -> None:
    # A half-sent request held a metrics place for 30 s. Fails if the server waits longer than
    # WAIT (10 s) for the rest, or closes it before REQUEST_TIMEOUT, or answers it.
    server = start_server(*METRICS)
    with socket.create_connection((HOST, metrics_port(server)), timeout=WAIT) as slow:
        slow.sendall(PARTIAL)
        start = time.monotonic()
        assert closed_by_server(slow, timeout=WAIT) == b""
        assert time.monotonic() - start >= REQUEST_TIMEOUT - 0.1
    assert scrape(server).value("fsmchat_connections_accepted_total") == 0


@pytest.mark.parametrize("stuck", ["half-sent requests", "idle keep-alive connections"])
def test_slow_scrapers_cannot_lock_a_real_scrape_out(start_server: StartServer, stuck: str) -> None:
    # MAX_SCRAPERS connections hold every place, either with requests that never end or idle
    # after one scrape (kept alive). A real scrape must still be answered at once, and the
    # oldest waiting connection is closed to make room for it. Fails if it is refused (busy).
    server = start_server(*METRICS)
    port = metrics_port(server)
    holders: list[socket.socket] = []
    try:
        for _ in range(MAX_SCRAPERS):
            holder = socket.create_connection((HOST, port), timeout=WAIT)
            holders.append(holder)
            if stuck == "half-sent requests":
                holder.sendall(PARTIAL)
            else:
                holder.sendall(PARTIAL + b"\r\n")
                head = recv_until(holder, lambda buf: b"\r\n\r\n" in buf, "a response head")
                assert http_status_of(head) == 200
        assert scrape(server).value("fsmchat_connections_accepted_total") == 0
        evicted = server.wait_event("http.evicted")
        oldest = "{}:{}".format(*holders[0].getsockname()[:2])
        assert evicted["peer"] == oldest, evicted
        assert evicted["served"] == (0 if stuck == "half-sent requests" else 1), evicted
        assert closed_by_server(holders[0]) == b""  # closed, and nothing more for it
        assert not server.events("http.rejected")
    finally:
        for holder in holders:
            holder.close()


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def test_metrics_port_equal_to_port_exits_2() -> None:
    port = str(free_port())
    usage_error(run_cli("--host", HOST, "--port", port, "--metrics-port", port), "--metrics-port")


@pytest.mark.parametrize("value", ["70000", "-1", "http"])
def test_bad_metrics_port_exits_2(value: str) -> None:
    usage_error(run_cli("--host", HOST, "--port", "0", "--metrics-port", value), "--metrics-port")


# --------------------------------------------------------------------------
# Who may scrape
# --------------------------------------------------------------------------


def test_deny_keeps_a_scraper_out_as_it_keeps_a_client_out(start_server: StartServer) -> None:
    # Fails if the metrics listener ignored --deny: the 127.0.0.2 scraper would get a 200.
    server = start_server(*METRICS, "--deny", "127.0.0.2/32")
    denied = socket.socket()
    denied.bind(("127.0.0.2", 0))
    denied.connect((HOST, metrics_port(server)))
    denied.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_server(denied) == b""  # no response, and closed
    denied.close()
    rejected = server.wait_event("http.rejected")
    assert rejected["reason"] == "denied" and rejected["peer"].startswith("127.0.0.2:")
    assert scrape(server).value("fsmchat_connections_accepted_total") == 0  # 127.0.0.1 may


def test_metrics_host_serves_metrics_on_its_own_address(start_server: StartServer) -> None:
    server = start_server(*METRICS, "--metrics-host", "127.0.0.3")
    port = metrics_port(server)
    with urllib.request.urlopen(f"http://127.0.0.3:{port}/metrics", timeout=WAIT) as response:
        assert response.status == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=WAIT).close()


def test_metrics_host_needs_metrics_port() -> None:
    usage_error(run_cli("--host", HOST, "--port", "0", "--metrics-host", HOST), "--metrics-host")
