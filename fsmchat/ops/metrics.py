"""Prometheus metrics: a catalogue of what is exported, and a collector that reads a snapshot.

Each ``MetricSpec`` names a metric, its type, its help text, and the ``Snapshot`` field it
is read from (a field holding a mapping gives one sample per key, under the spec's label). The
README's metric table and the tests read ``CATALOGUE``, and rendering is ``prometheus_client``'s
own exposition for a registry holding just this collector: nothing here formats text by hand.

Rules it keeps:
- Nothing is counted at scrape time that the server does not count already: a scrape is one
  snapshot, turned into metric families.
- Redis metrics appear only with ``--redis`` (their snapshot fields are None without it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fsmchat.ops.stats import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text format ``generate_latest`` writes."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exported; a counter's samples add ``_total``
    kind: str  # "counter" or "gauge"
    field: str  # the snapshot field it reads
    help: str
    label: str | None = None  # for a field that maps label values to numbers


CATALOGUE: tuple[MetricSpec, ...] = (
    MetricSpec("fsmchat_connections", "gauge", "connections", "Client connections by state",
               "state"),
    MetricSpec("fsmchat_connections_accepted", "counter", "accepted",
               "Client connections accepted"),
    MetricSpec("fsmchat_connections_closed", "counter", "closed",
               "Client connections closed, by reason", "reason"),
    MetricSpec("fsmchat_connections_rejected", "counter", "rejected",
               "Client connections turned away at once, by reason", "reason"),
    MetricSpec("fsmchat_messages_received", "counter", "messages_in",
               "Messages read from local clients (raw: recv calls; chat: lines)"),
    MetricSpec("fsmchat_messages_delivered", "counter", "messages_out",
               "Messages queued to local clients, one per recipient"),
    MetricSpec("fsmchat_received_bytes", "counter", "bytes_in", "Bytes read from clients"),
    MetricSpec("fsmchat_sent_bytes", "counter", "bytes_out", "Bytes written to clients"),
    MetricSpec("fsmchat_queued_bytes", "gauge", "queued_bytes",
               "Bytes waiting in all client queues"),
    MetricSpec("fsmchat_queued_bytes_max", "gauge", "queued_max",
               "Bytes waiting in the largest client queue"),
    MetricSpec("fsmchat_loop_iterations", "counter", "loop_turns", "Turns of the select loop"),
    MetricSpec("fsmchat_select_seconds", "counter", "select_seconds",
               "Seconds the loop spent waiting in select"),
    MetricSpec("fsmchat_lines_cut", "counter", "lines_cut",
               "Chat lines longer than --max-line, cut into pieces"),
    MetricSpec("fsmchat_history_messages", "gauge", "history",
               "Messages kept for late joiners"),
    MetricSpec("fsmchat_log_dropped", "counter", "log_dropped",
               "Status events dropped whole because the log reader fell behind, by level",
               "level"),
    MetricSpec("fsmchat_start_time_seconds", "gauge", "start_time",
               "When the server started, in seconds since the Unix epoch"),
    MetricSpec("fsmchat_redis_published", "counter", "redis_published",
               "Messages published on the Redis channel (with --redis)"),
    MetricSpec("fsmchat_redis_received", "counter", "redis_received",
               "Messages received from other instances (with --redis)"),
    MetricSpec("fsmchat_redis_dropped", "counter", "redis_dropped",
               "Messages dropped from the Redis outbox (with --redis)"),
    MetricSpec("fsmchat_redis_missed", "counter", "redis_missed",
               "Gaps in other instances' numbering: messages never received (with --redis)"),
    MetricSpec("fsmchat_redis_duplicates", "counter", "redis_duplicates",
               "Repeats from other instances dropped (with --redis)"),
    MetricSpec("fsmchat_redis_oversize", "counter", "redis_oversize",
               "Messages from the channel dropped as larger than a client's queue (with --redis)"),
    MetricSpec("fsmchat_redis_gaps", "counter", "redis_gaps",
               "Gaps in streams: entries this instance missed, trimmed away before it could read "
               "them (redis.gap says how many; with --redis)"),
    MetricSpec("fsmchat_redis_skipped", "counter", "redis_skipped",
               "Stream entries skipped as not fsmchat's (no field m; with --redis)"),
)


class SnapshotCollector:
    """A ``prometheus_client`` collector: one snapshot per scrape, one family per spec."""

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self.take = take

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on --redis: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        record = self.take()
        for spec in CATALOGUE:
            value = getattr(record, spec.field)
            if value is None:  # (a redis_ figure, standalone)
                continue
            family_type = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            if spec.label is None:
                yield family_type(spec.name, spec.help, value=value)
                continue
            family = family_type(spec.name, spec.help, labels=[spec.label])
            for key, number in sorted(value.items()):
                family.add_metric([str(key)], number)
            yield family


class Exposition:
    """What ``GET /metrics`` answers: the text format of a registry of our own."""

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(take))

    def render(self) -> bytes:
        return generate_latest(self.registry)
