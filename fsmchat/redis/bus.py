"""The Redis bus: several instances of the server share one chat over one pub/sub channel.

Each instance has two links (``redis_link``) of this module's: one publishes every message a
local client sends, one is subscribed to the channel and hands every message of another instance
to the local chat; with streams a third, ``streams.HistoryLink``, reads what was missed.
In chat mode a third, ``presence.PresenceLink``, shares who is connected where; the subscriber
then listens to its channel too (``listen``), and the bus watches all three (``add_link``).
On the channel a message is an envelope and the client's bytes, untouched::

    fsmchat1 <instance id> <sequence number>[ <said>]\\n<message>

(in chat mode the message's first line says where it goes, ``#ROOM`` or ``@NAME``: the hub's
``head``, written after the envelope so that the message itself is never copied).

The instance id (16 hex digits, new at every start) lets an instance drop its own messages when
they come back; the sequence number (1, 2, 3, ... per instance) lets a receiver drop repeats and
count what it missed. ``said`` (Unix time in milliseconds) is there only on a message that
waited for the publish link to come back (an outage): receivers deliver such a message, and one
that fills a gap late or that a sync of the streams brought, as late (chat mode marks it as
delayed, its history keeps it as it was said). A payload without the
envelope, from ``redis-cli PUBLISH`` say, is delivered as it is.

The bus tells its owner (``on_links``) once when the links are lost (the first loss of an
outage, however many retries follow) and once when every link is back. A link that gets through
has the others dial at once, so they come back together.

The channel is untrusted: anyone who may PUBLISH on it can send any bytes, and any envelope.
- An envelope is one only if it is exactly ``fsmchat1 <16 hex digits> <1 to 19 digits>\n``;
  anything else is a foreign payload.
- A number at or below what its instance sent last is a repeat only if it was seen: the gaps
  (numbers skipped, at most ``GAPS_MAX`` runs per instance) are kept, and a number in one is
  delivered late and taken off ``missed``. One instance's messages come in order, so only a
  forged number ahead makes real ones come late; it costs the one real message it equals.
  ``missed`` is counted (``redis.missed``) when a gap appears, so that a real gap is told at
  once; past ``GAPS_MAX`` the two closest gaps are joined and what lay between them counts too
  (dropping a gap would make its real messages repeats again).
- A number far from what its instance sent last changes nothing for good: a jump forward past
  ``GAP_MAX`` or back past ``REPEATS_MAX`` (and in no gap) is a new count for that instance
  (``redis.renumbered``), neither messages missed nor repeats to drop.
- A payload larger than a client's queue may hold (``--max-queue-bytes``) is dropped and counted
  (``redis.oversize``): it would close every local client.

Delivery (README, "Several instances" says the same to users):
- Per sender, order holds everywhere: one publish link, one channel, one subscriber per instance.
- Messages wait in the outbox while the publish link is down, and up to a window of them wait
  for Redis's reply while it is up; a reply takes a message out. A link lost before the reply
  sends it again on reconnect, and receivers drop the repeat by its sequence number.
- The outbox is bounded (``--redis-outbox``): past it, the oldest waiting message is dropped and
  counted (``redis.dropped``), and receivers count the gap (``redis.missed``).
- After an outage, the outbox waits (up to ``HOLD_MAX``) until as many subscribers are back as
  the last message before the outage reached, so instances that reconnect a little later than
  this one still get it.
- Pub/sub itself keeps nothing: an instance whose subscriber is down misses what others publish
  in that time, and finds out by the gap in their sequence numbers. So room messages are also
  kept in streams (``redis/streams.py``), read back after the subscriber returns: exactly once,
  in order, unless a stream trimmed them away first (``redis.gap``). Without streams
  (``--no-redis-streams``), and for private messages: at most once across an outage of its
  subscriber or beyond the outbox's bound; exactly once otherwise.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
from structlog.typing import FilteringBoundLogger

from fsmchat.hub import Extension
from fsmchat.lifecycle import LinkState, LinkTrigger
from fsmchat.net.loop import EventLoop, Timer
from fsmchat.reasons import Reason
from fsmchat.redis.link import STABLE, RedisAddress, RedisLink
from fsmchat.redis.streams import (
    PREFIX,
    PUBLISH_SCRIPT,
    PUBLISH_SHA,
    STREAM_MIN,
    EntryId,
    HistoryLink,
    Synced,
    entry_text,
    parse_live,
    stream_entries,
)

ENVELOPE = b"fsmchat1 "
"""What every payload of ours starts with; the number is the envelope's version."""

_ENVELOPE = re.compile(rb"fsmchat1 ([0-9a-f]{16}) ([0-9]{1,19})(?: ([0-9]{1,15}))?\n")
"""A whole envelope line: the instance id, the sequence number and, on a delayed message, when
it was said."""

CRLF = b"\r\n"

WINDOW_MAX = 1024 * 1024
"""Bytes of PUBLISH commands sent and not yet answered, at most (half the outbox if smaller):
enough to keep Redis busy, few enough that the rest of the outbox can still be dropped."""

HOLD_MAX = 5.0
"""Seconds the outbox may wait after a reconnect for the other instances' subscribers."""

HOLD_POLL = 0.1
"""Seconds between two PUBSUB NUMSUB questions while the outbox waits."""

DROP_REPORT = 1.0
"""Seconds between two redis.dropped warnings while messages are being dropped."""

ORIGINS_MAX = 4096
"""Instances whose last sequence number is remembered; the oldest is forgotten past this."""

REPEATS_MAX = 1 << 16
"""How far below an instance's last number a repeat can be: a lost link sends again at most one
window of PUBLISHes (``WINDOW_MAX`` bytes, more than 16 bytes each). A number further back is a
new count for that instance, not a repeat."""

GAP_MAX = 1 << 20
"""The longest jump forward in an instance's numbering counted as messages missed; past it the
number is a new count for that instance (a forged one, or an outage of a million messages)."""

GAPS_MAX = 16
"""Gaps (runs of numbers skipped) remembered per instance: a number in one is delivered when it
comes late, any other number at or below the last is a repeat."""

PING_IDLE = 2.0
"""Seconds the subscriber may hear nothing before it PINGs: Redis must then answer in time
(``redis_link.ANSWER_TIMEOUT``), so a Redis host that vanished is noticed."""

Message = tuple[int, bytes, bytes, bytes, int, int]
"""(sequence number, the command up to its payload, the payload up to the client's bytes (the
envelope, chat's head), the client's bytes, bytes on the wire, when it was said in ms if it
waits for an outage to end, else 0)."""

SYNC_MAX = 10.0
"""Seconds the subscriber holds live messages back for a sync's answer, at most: past it they
go on, and what the answer then brings comes after them, late (never twice)."""

HELD_MAX = 16 * 1024 * 1024
"""Bytes of live messages the subscriber holds back while a sync runs, at most: past it they go
on, and what the sync then brings comes after them, late (never twice)."""

CLOCK_SLACK = 60_000
"""Milliseconds an entry id may be ahead of Redis's clock (as the last sync read it) and still
count as the newest entry seen: one further ahead was forged (a ``PUBLISH`` by hand), and taking
it would make the next sync skip real entries."""

LIVE_MAX = 1 << 17
"""Entries the channel delivers while a late sync is awaited that are remembered (so that the
answer does not deliver them again), at most; past it the rest may come twice."""

Rebuild = Callable[[bytes, list[tuple[bytes, int, bytes]]], None]
"""``rebuild(room key, [(message id, when Redis took it in ms, message), ...])``, oldest first."""

StreamOf = Callable[[bytes], "bytes | None"]
"""The stream a payload's head belongs to (chat mode's ``#ROOM``), None for none (``@NAME``)."""

Deliver = Callable[[bytes, bytes, "int | None"], bool]
"""What a message of another instance's is handed to: ``deliver(message, its id, late)``, late
None for one on time, else when it was said in Unix ms (0: it does not say); True when local
recipients are congested (the subscriber pauses)."""


def new_origin() -> bytes:
    return os.urandom(8).hex().encode()


def unpack(payload: bytes, start: int = 0) -> tuple[bytes | None, int, int | None, bytes]:
    """(origin, sequence number, when it was said if delayed, message) of a payload (from
    ``start``); origin None for a foreign payload."""
    envelope = _ENVELOPE.match(payload, start)
    if envelope is None:
        return None, 0, None, payload[start:] if start else payload
    said = envelope[3]
    return (envelope[1], int(envelope[2]), int(said) if said is not None else None,
            payload[envelope.end():])


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Round:
    """One subscription's sync: what it asks after (as it was when the subscription began),
    and the entries the channel delivered before its answer (None once answered)."""

    known: dict[bytes, tuple[EntryId, int]]
    high: EntryId | None
    subscribed_ms: int = 0  # Redis's clock just before the subscription (0: unknown)
    live: set[tuple[bytes, EntryId]] | None = field(default_factory=set)


class PublishLink(RedisLink):
    """PUBLISHes every local message once, in order, from a bounded outbox."""

    role = "publish"

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger, *,
                 channel: bytes, origin: bytes, outbox_limit: int,
                 stream_of: StreamOf | None = None, streams_key: bytes = b"",
                 stream_length: int = STREAM_MIN) -> None:
        super().__init__(address, loop, log)
        self.channel = channel
        self.prefix = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(channel), channel)
        self.stream_of = stream_of  # None: no streams (pub/sub alone)
        self.streams_key = streams_key
        self.stream_length = b"%d" % stream_length
        self.prefixes: dict[bytes, bytes] = {}  # head -> the command up to its payload
        self.envelope = ENVELOPE + origin + b" "
        self.outbox_limit = outbox_limit
        self.window = min(WINDOW_MAX, outbox_limit // 2)
        self.seq = 0
        self.unsent: deque[Message] = deque()  # waiting to be written, oldest first
        self.unsent_bytes = 0
        self.inflight: deque[Message] = deque()  # written, waiting for Redis's reply
        self.inflight_bytes = 0
        self.audience = 0  # subscribers the last PUBLISH reached
        self.hold_started: float | None = None  # set while the outbox waits for them
        self.hold_timer: Timer | None = None
        self.hold_logged = False  # redis.holding said for the current hold
        self.questions = 0  # PUBSUB NUMSUB sent and not yet answered
        self.published = 0
        self.dropped = 0
        self.unreported = 0  # dropped since the last redis.dropped warning
        self.report_timer: Timer | None = None

    def publish(self, data: bytes, head: bytes = b"", seq: int = 0) -> None:
        """``data`` (number ``seq``; 0: the next) on the channel, after the envelope and
        ``head`` (chat mode's first line); with streams, in its stream too."""
        self.seq = seq = seq or self.seq + 1
        ready = self.state == LinkState.READY
        if ready:
            envelope = b"%s%d\n%s" % (self.envelope, seq, head)
            said = 0
        else:  # it waits for the link: receivers are told when it was said
            said = now_ms()
            envelope = b"%s%d %d\n%s" % (self.envelope, seq, said, head)
        prefix = self.prefixes.get(head) if self.stream_of is not None else self.prefix
        if prefix is None:
            prefix = self._prefix(head)
        size = len(prefix) + 16 + len(envelope) + len(data) + 2
        self.unsent.append((seq, prefix, envelope, data, size, said))
        self.unsent_bytes += size
        if self.unsent_bytes + self.inflight_bytes > self.outbox_limit:
            self._drop_oldest()
        if ready and self.hold_started is None:
            self._fill()

    def _prefix(self, head: bytes) -> bytes:
        """The command that publishes a payload of ``head``'s, up to the payload: the stream
        script for a room's, PUBLISH for the rest. Made once per head."""
        assert self.stream_of is not None
        stream = self.stream_of(head)
        if stream is None:
            prefix = self.prefix
        else:
            prefix = hiredis.pack_command((  # type: ignore[arg-type] # stub: a 1-tuple
                b"EVALSHA", PUBLISH_SHA, b"2", stream, self.streams_key, self.channel,
                self.stream_length, b""))
            prefix = prefix[:-len(b"$0\r\n\r\n")]  # (the empty payload cut off)
        if len(self.prefixes) < 4096:
            self.prefixes[head] = prefix
        return prefix

    def _delayed(self, message: Message, said: int) -> Message:
        """``message`` with ``said`` in its envelope: it waits for the link to come back."""
        seq, prefix, envelope, data, _, marked = message
        if marked:
            return message
        first = envelope[envelope.index(b"\n") + 1:]  # what follows the envelope: chat's head
        envelope = b"%s%d %d\n%s" % (self.envelope, seq, said, first)
        return seq, prefix, envelope, data, len(prefix) + 16 + len(envelope) + len(data) + 2, said

    def _fill(self) -> None:
        """Hand waiting messages to the socket, up to the window."""
        unsent, inflight, window = self.unsent, self.inflight, self.window
        while unsent and self.inflight_bytes < window:
            message = unsent.popleft()
            self.unsent_bytes -= message[4]
            inflight.append(message)
            self.inflight_bytes += message[4]
            envelope, data = message[2], message[3]
            self.push(b"%s$%d\r\n%s" % (message[1], len(envelope) + len(data), envelope))
            self.push(data)
            self.push(CRLF)

    def _drop_oldest(self) -> None:
        dropped = 0
        while self.unsent and self.unsent_bytes + self.inflight_bytes > self.outbox_limit:
            self.unsent_bytes -= self.unsent.popleft()[4]
            dropped += 1
        self.dropped += dropped
        self.unreported += dropped
        if self.report_timer is None:
            self._report_drops()

    def _report_drops(self) -> None:
        """Warn now, then at most once per DROP_REPORT while drops go on."""
        self.report_timer = None
        if self.unreported:
            self.log.warning("redis.dropped", reason=Reason.OUTBOX_FULL, messages=self.unreported,
                             limit=self.outbox_limit)
            self.unreported = 0
            self.report_timer = self.loop.call_later(DROP_REPORT, self._report_drops)

    # -- hooks -----------------------------------------------------------------------------------

    def greeting(self) -> list[tuple[bytes, ...]]:
        if self.stream_of is None:
            return super().greeting()
        return [(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT)]

    def ready(self) -> None:
        if self.unsent and self.audience:
            self.hold_started = time.monotonic()
            self._ask_audience()
        else:
            self._fill()

    def _ask_audience(self) -> None:
        self.hold_timer = None
        if self.state == LinkState.READY:
            self.questions += 1
            self.send_command(b"PUBSUB", b"NUMSUB", self.channel)

    def on_reply(self, reply: Any) -> None:
        if type(reply) is int and self.inflight:
            seq, _, _, data, size, _ = self.inflight.popleft()
            self.inflight_bytes -= size
            self.published += 1
            self.audience = reply
            self.log.debug("redis.published", seq=seq, bytes=len(data), receivers=reply)
            self._fill()
        elif (type(reply) is list and self.questions and len(reply) == 2
              and type(reply[1]) is int):
            self.questions -= 1
            if self.hold_started is not None:
                self._audience_counted(reply[1])
        elif isinstance(reply, hiredis.ReplyError):
            self.lose(f"PUBLISH refused: {reply}")
            return
        else:
            self.unexpected(reply)
            return
        if self.state == LinkState.DRAINING and self.idle():
            self.fire(LinkTrigger.DRAINED)

    def _audience_counted(self, subscribers: int) -> None:
        assert self.hold_started is not None
        waited = time.monotonic() - self.hold_started
        if subscribers < self.audience and waited < HOLD_MAX:
            if not self.hold_logged:
                self.hold_logged = True
                self.log.info("redis.holding", messages=len(self.unsent),
                              subscribers=subscribers, expected=self.audience)
            self.hold_timer = self.loop.call_later(HOLD_POLL, self._ask_audience)
            return
        if self.hold_logged:
            self.log.info("redis.flushing", messages=len(self.unsent), subscribers=subscribers,
                          waited=round(waited, 3))
        self._end_hold()
        self._fill()

    def _end_hold(self) -> None:
        self.hold_started = None
        self.hold_logged = False
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None

    def awaiting(self) -> bool:
        return bool(self.inflight or self.questions)

    def lost(self) -> None:
        """What was written and not answered goes again after the outage, with what waits:
        each now says when it was said (about now, for those that did not yet), as it will
        reach the other instances late."""
        self._end_hold()
        self.questions = 0
        said = now_ms()
        waiting = [self._delayed(message, said) for message in (*self.inflight, *self.unsent)]
        self.unsent = deque(waiting)
        self.unsent_bytes = sum(message[4] for message in waiting)
        self.inflight.clear()
        self.inflight_bytes = 0
        if self.unsent_bytes > self.outbox_limit:  # (the envelopes grew)
            self._drop_oldest()

    def drain(self) -> None:
        if self.hold_started is not None:  # stopping: nobody can wait for latecomers now
            self._end_hold()
            self._fill()
        super().drain()

    def idle(self) -> bool:
        return not self.unsent and not self.inflight

    def closed(self) -> None:
        if self.report_timer is not None:
            self.report_timer.cancel()
        if self.unreported:
            self.log.warning("redis.dropped", reason=Reason.OUTBOX_FULL, messages=self.unreported,
                             limit=self.outbox_limit)
        left = len(self.unsent) + len(self.inflight)
        if left:
            self.dropped += left
            self.log.warning("redis.dropped", reason=Reason.SHUTDOWN, messages=left,
                             limit=self.outbox_limit)
        self.unsent.clear()
        self.inflight.clear()
        self._end_hold()

    def counters(self) -> dict[str, int]:
        return {"published": self.published, "dropped": self.dropped}


class SubscribeLink(RedisLink):
    """Receives the channel; hands other instances' messages to the local chat, once, in order."""

    role = "subscribe"

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger, *,
                 channel: bytes, origin: bytes, deliver: Deliver, payload_limit: int) -> None:
        super().__init__(address, loop, log)
        self.channel = channel
        self.origin = origin
        self.deliver = deliver
        self.payload_limit = payload_limit
        self.also: dict[bytes, Callable[[bytes], None]] = {}  # more channels: who hears each
        self.subscribed: list[Callable[[], None]] = []  # told at each new subscription
        self.last_seq: dict[bytes, int] = {}  # origin -> newest sequence number delivered
        self.gaps: dict[bytes, list[list[int]]] = {}  # origin -> [first, last] numbers unseen
        self.pinged = False  # a PING is waiting for its pong
        self.streams = False  # live messages may be streams' entries (the bus syncs them)
        self.last_ids: dict[bytes, tuple[EntryId, int]] = {}  # stream -> the newest entry of
        # it seen, and that entry's number
        self.high: EntryId | None = None  # the newest entry seen of any stream (None: none yet)
        self.round = Round({}, None)  # what the sync of this subscription asks after
        self.fresh: set[tuple[bytes, EntryId]] = set()  # entries the last sync delivered: one
        # that comes live too is a repeat
        self.holding = False  # a sync runs: what the channel brings waits in ``held``
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.clock_offset = 0  # Redis's clock less this one's, in ms, as the last sync told
        self.recovered: set[bytes] = set()  # streams the last sync delivered missed entries of
        self.subscribed_ms = 0  # Redis's clock just before this session subscribed
        self.seed: Callable[[bytes, bytes, int], None] | None = None  # the history's past
        self.on_gap: Callable[[bytes], None] | None = None  # told the stream of each gap
        self.foreign_head: Callable[[bytes], bytes] | None = None  # what goes before an entry
        # no instance wrote, for its stream (chat mode: the room's head)
        self.received = 0
        self.missed = 0
        self.duplicates = 0
        self.oversize = 0
        self.stream_gaps = 0  # gaps in streams: missed entries trimmed away before it read them
        self.skipped = 0

    def greeting(self) -> list[tuple[bytes, ...]]:
        # One SUBSCRIBE per channel: each is one reply, as the greeting counts them. With
        # streams, Redis's clock just before: what is made after that millisecond comes live.
        clock: list[tuple[bytes, ...]] = [(b"TIME",)] if self.streams else []
        return clock + [(b"SUBSCRIBE", channel) for channel in (self.channel, *self.also)]

    def greeting_reply(self, reply: Any) -> None:
        if (type(reply) is list and len(reply) == 2
                and all(type(part) is bytes and part.isdigit() for part in reply)):
            self.subscribed_ms = int(reply[0]) * 1000 + int(reply[1]) // 1000

    def ready(self) -> None:
        self.pinged = False
        if self.streams:  # live messages wait until the sync says what was missed
            self.holding = True
            self.round = Round(dict(self.last_ids), self.high, self.subscribed_ms)
        for told in self.subscribed:  # what was said while unsubscribed was missed
            told()

    def on_reply(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
            if type(reply[2]) is not bytes:
                self.unexpected(reply)
            elif reply[1] == self.channel:
                self._live(reply[2])
            else:
                heard = self.also.get(reply[1])
                if heard is None:
                    self.unexpected(reply)
                else:
                    heard(reply[2])
        elif type(reply) is list and reply[:1] == [b"pong"] and self.pinged:
            self.pinged = False
        elif isinstance(reply, hiredis.ReplyError):
            self.lose(f"subscriber refused: {reply}")
        else:
            self.unexpected(reply)

    def awaiting(self) -> bool:
        return self.pinged

    def quiet(self, silent: float) -> None:
        if silent >= PING_IDLE and not self.pinged:
            self.pinged = True
            self.send_command(b"PING")

    def _live(self, payload: bytes) -> None:
        """A message on the channel. While a sync runs, every one waits (so that none overtakes
        what the sync brings); a stream's entry that the sync delivered already is a repeat."""
        if self.holding:
            self.held.append(payload)
            self.held_bytes += len(payload)
            if self.held_bytes > HELD_MAX:
                self.release()
            return
        if payload[:10] != PREFIX:
            self._message(payload)
            return
        entry = parse_live(payload)
        if entry is None:
            self._message(payload)
            return
        stream, key, number, start = entry
        if self.fresh and (stream, key) in self.fresh:
            self.duplicates += 1
            return
        if key[0] <= now_ms() + self.clock_offset + CLOCK_SLACK:  # (else forged: no mark)
            self._seen(stream, key, number)
        live = self.round.live
        if live is not None and len(live) < LIVE_MAX:
            live.add((stream, key))
        self._message(payload, None, start)

    def _seen(self, stream: bytes, key: EntryId, number: int) -> None:
        last = self.last_ids.get(stream)
        if last is None or key > last[0]:
            self.last_ids[stream] = key, number
        if self.high is None or key > self.high:
            self.high = key

    def release(self) -> None:
        """What the channel brought meanwhile goes on (the sync's answer came, or is late)."""
        self.holding = False
        held, self.held, self.held_bytes = self.held, [], 0
        for payload in held:
            if self.sock is None:
                return  # (a delivery ended the session)
            self._live(payload)

    def synced(self, done: Synced, streams: int) -> None:
        """What the sync read (of ``streams`` streams): what was missed, in order (late), the
        past never heard of (to history only), the gaps told; then what was held back. What the
        channel delivered meanwhile (the answer came after ``SYNC_MAX``) is not delivered
        again: the rest comes after it, late."""
        round_ = self.round
        first = round_.high is None and not round_.known
        self.clock_offset = done.redis_ms - now_ms()
        self.log.info("redis.synced", streams=streams,
                      missed=sum(entry.deliver for entry in done.entries),
                      past=sum(not entry.deliver for entry in done.entries),
                      gaps=len(done.gaps), held=len(self.held))
        coming = set(round_.live or ())  # delivered live already, or held to be: not missed
        for payload in self.held:
            entry = parse_live(payload) if payload[:10] == PREFIX else None
            if entry is not None:
                coming.add((entry[0], entry[1]))
        self._take(done, coming, round_.subscribed_ms or done.redis_ms)
        round_.live = None
        if first:  # from now on this process hears every entry, or knows it missed it
            since = (done.redis_ms - 1, 1 << 62)
            if self.high is None or since > self.high:
                self.high = since
        if self.holding:
            self.release()

    def _take(self, done: Synced, coming: set[tuple[bytes, EntryId]], since: int) -> None:
        """``coming``: entries the channel brought or holds (none of them missed); so is one
        made after the millisecond ``since`` (when the subscription began): on its way."""
        fresh = self.fresh = set()
        self.recovered = set()
        for entry in done.entries:
            where = (entry.stream, entry.key)
            if where in coming or (entry.deliver and entry.key[0] > since):
                continue
            self._seen(entry.stream, entry.key, entry.number)
            if entry.payload is None:
                self.skipped += 1
                self.log.warning("redis.skipped", stream=entry.stream.decode(errors="replace"),
                                 id=entry_text(entry.key).decode())
                continue
            payload = entry.payload
            if self.foreign_head is not None and _ENVELOPE.match(payload) is None:
                payload = self.foreign_head(entry.stream) + payload  # (an XADD by hand: for
                # the stream's room, whatever it says)
            if entry.deliver:
                fresh.add(where)
                self.recovered.add(entry.stream)
                self._message(payload, entry.key[0])
            elif self.seed is not None:
                origin, seq, _, data = unpack(payload)
                if origin != self.origin:  # (its own are in its history already)
                    self.seed(data, b"%s-%d" % (origin, seq) if origin is not None else b"",
                              entry.key[0])
        for stream, lost, _ in done.gaps:
            self.stream_gaps += 1
            self.log.warning("redis.gap", stream=stream.decode(errors="replace"), entries=lost)
            if self.on_gap is not None:
                self.on_gap(stream)

    def _message(self, payload: bytes, stored_ms: int | None = None, start: int = 0) -> None:
        """A payload of the bus's (from ``start``); ``stored_ms``: a stream's entry a sync
        brought (late), when Redis took it."""
        origin, seq, said, data = unpack(payload, start)
        late = said is not None or stored_ms is not None
        said = said or stored_ms
        if origin is not None:
            if origin == self.origin:
                return
            last = self.last_seq.get(origin)
            if last is None:
                if len(self.last_seq) >= ORIGINS_MAX:
                    oldest = next(iter(self.last_seq))
                    del self.last_seq[oldest]
                    self.gaps.pop(oldest, None)
                self.last_seq[origin] = seq
            elif seq == last + 1:
                self.last_seq[origin] = seq
            elif seq > last:
                self._ahead(origin, last, seq)
                self.last_seq[origin] = seq
            elif self._late(origin, seq, last):
                late = True
            elif seq > last - REPEATS_MAX:
                self.duplicates += 1
                return
            else:
                self._renumbered(origin, last, seq)
                self.last_seq[origin] = seq
        if len(data) > self.payload_limit:
            self.oversize += 1
            self.log.warning("redis.oversize", origin=origin and origin.decode(),
                             bytes=len(data), limit=self.payload_limit)
            return
        self.received += 1
        self.log.debug("redis.received", origin=origin and origin.decode(), seq=seq,
                       bytes=len(data))
        msg_id = b"%s-%d" % (origin, seq) if origin is not None else b""
        if (self.deliver(data, msg_id, (said or 0) if late else None)
                and self.state == LinkState.READY):
            self.fire(LinkTrigger.THROTTLE)

    def _renumbered(self, origin: bytes, last: int, seq: int) -> None:
        """A new count from ``seq``: the gaps it went back past are given up (still missed)."""
        self.log.warning("redis.renumbered", origin=origin.decode(), last=last, seq=seq)
        gaps = self.gaps.get(origin)
        if gaps:
            gaps[:] = [[first, min(end, seq - 1)] for first, end in gaps if first < seq]

    def _ahead(self, origin: bytes, last: int, seq: int) -> None:
        """Numbers ``last + 1`` to ``seq - 1`` skipped: missed, unless they arrive later."""
        if seq - last - 1 > GAP_MAX:
            self._renumbered(origin, last, seq)
            return
        self.missed += seq - last - 1
        self.log.warning("redis.missed", origin=origin.decode(), messages=seq - last - 1)
        gaps = self.gaps.setdefault(origin, [])
        gaps.append([last + 1, seq - 1])
        self._bound(gaps, seq)

    def _late(self, origin: bytes, seq: int, last: int) -> bool:
        """Whether ``seq`` is in a gap of ``origin``'s, and so no repeat; it is then seen."""
        gaps = self.gaps.get(origin)
        if not gaps:
            return False
        for i, gap in enumerate(gaps):
            first, end = gap
            if seq < first:
                return False
            if seq <= end:
                if first == end:
                    del gaps[i]
                elif seq == first:
                    gap[0] = seq + 1
                elif seq == end:
                    gap[1] = seq - 1
                else:
                    gap[1] = seq - 1
                    gaps.insert(i + 1, [seq + 1, end])
                    self._bound(gaps, last)
                self.missed -= 1
                return True
        return False

    def _bound(self, gaps: list[list[int]], last: int) -> None:
        """At most GAPS_MAX gaps: the oldest goes if it is out of the repeats' reach, else the
        two closest become one, and what they had between them counts as missed (it was seen,
        so that is at most until it is seen again; dropping a gap instead would make its numbers
        repeats, and a few forged numbers could silence an instance again)."""
        while len(gaps) > GAPS_MAX:
            if gaps[0][1] <= last - REPEATS_MAX:
                del gaps[0]
                continue
            i = min(range(len(gaps) - 1), key=lambda j: gaps[j + 1][0] - gaps[j][1])
            self.missed += gaps[i + 1][0] - gaps[i][1] - 1
            gaps[i][1] = gaps[i + 1][1]
            del gaps[i + 1]

    def lost(self) -> None:
        self.pinged = False
        self.holding = False  # what was held is fetched again by the next sync
        self.held, self.held_bytes = [], 0
        self.round.live = None

    def unpause(self) -> None:
        if self.state == LinkState.PAUSED:
            self.fire(LinkTrigger.RESUME)

    def counters(self) -> dict[str, int]:
        return {"received": self.received, "missed": self.missed}


class RedisBus(Extension):
    """The links of one instance, and the totals ``server.stopped`` reports. An extension
    of the hub: it publishes what local clients say, and its subscriber pauses while flow
    control holds relayed messages back."""

    def __init__(self, address: RedisAddress, channel: str, loop: EventLoop,
                 log: FilteringBoundLogger, *, outbox_limit: int, payload_limit: int,
                 deliver: Deliver, origin: bytes | None = None, stream_of: StreamOf | None = None,
                 history: int = 0) -> None:
        """``stream_of``: the stream of each head (None: pub/sub alone, no streams);
        ``history``: the entries of a stream a newcomer is given (--history)."""
        self.origin = origin or new_origin()
        self.address = address
        self.channel = channel
        name = channel.encode()
        self.keys_prefix = b"fsmchat:%s:" % name
        self.streams_key = self.keys_prefix + b"streams"
        self.history = history
        self.publisher = PublishLink(address, loop, log, channel=name, origin=self.origin,
                                     outbox_limit=outbox_limit, stream_of=stream_of,
                                     streams_key=self.streams_key,
                                     stream_length=max(history, STREAM_MIN))
        self.subscriber = SubscribeLink(address, loop, log, channel=name, origin=self.origin,
                                        deliver=deliver, payload_limit=payload_limit)
        self.history_link: HistoryLink | None = None
        self.sync_wanted = False  # the subscriber (re)subscribed: a sync is to be sent
        self.sync_round = 0  # syncs asked for: an answer to an older one is of no use
        self.links: list[RedisLink] = []
        self.up: set[RedisLink] = set()  # links whose session is ready now
        self.apart = False  # some link is lost
        self.told = False  # on_links(False) said so, and on_links(True) has not yet
        self.together_since: float | None = None  # when every link was last back
        self.apart_since = 0.0  # when the loss not told yet began
        self.on_links: Callable[[bool], None] | None = None
        """Told ``False`` at the first loss of an outage, ``True`` once every link is back."""
        self.add_link(self.subscriber)
        self.add_link(self.publisher)
        if stream_of is not None:
            self.subscriber.streams = True
            self.subscriber.subscribed.append(self._want_sync)
            self.history_link = HistoryLink(address, loop, log, streams_key=self.streams_key,
                                            on_ready=self._sync, on_lost=self._history_lost)
            self.add_link(self.history_link)
        self.loop = loop
        self.sync_open = False  # a sync was sent and is not answered yet
        self.rebuild: Rebuild | None = None
        """Given a room's newest entries in the stream's order after a sync brought some of
        its missed ones: its history becomes that (chat mode)."""
        self.sync_timer: Timer | None = None

    def stream(self, name: bytes) -> bytes:
        """The key of the stream ``name`` (a room's key; raw mode: b"")."""
        return self.keys_prefix + (b"history:" + name if name else b"history")

    def stream_name(self, stream: bytes) -> bytes:
        """What ``stream`` is of: a room's key, or b"" (raw mode's one stream)."""
        return stream.removeprefix(self.keys_prefix + b"history").removeprefix(b":")

    def _want_sync(self) -> None:
        self.sync_wanted = True
        if self.sync_timer is not None:
            self.sync_timer.cancel()
        self.sync_timer = self.loop.call_later(SYNC_MAX, self._sync_late)
        self._sync()

    def _reread(self, stream: bytes) -> None:
        """A stream whose missed entries came late: its newest, in the stream's order, for its
        history (which had its own lines of the outage where they were said)."""
        assert self.history_link is not None and self.rebuild is not None
        rebuild = self.rebuild

        def read(reply: Any) -> None:
            past = []
            for entry in reversed(stream_entries(stream, reply, False)):
                if entry.payload is None:
                    continue
                payload = entry.payload
                if _ENVELOPE.match(payload) is None and self.subscriber.foreign_head is not None:
                    payload = self.subscriber.foreign_head(stream) + payload
                origin, seq, _, data = unpack(payload)
                past.append((b"%s-%d" % (origin, seq) if origin is not None else b"",
                             entry.key[0], data))
            rebuild(self.stream_name(stream), past)

        self.history_link.ask(read, b"XREVRANGE", stream, b"+", b"-", b"COUNT",
                              b"%d" % self.history)

    def _sync_late(self) -> None:
        """No answer in time: what the subscriber held goes on."""
        self.sync_timer = None
        subscriber = self.subscriber
        if subscriber.holding:
            subscriber.release()

    def _history_lost(self) -> None:
        if self.sync_open:  # asked again once the link is back
            self.sync_open = False
            self.sync_wanted = True

    def _sync(self) -> None:
        """Ask what was missed, once both the subscriber and the history link are up."""
        link = self.history_link
        if (link is None or not self.sync_wanted or link.state != LinkState.READY
                or self.subscriber.state not in (LinkState.READY, LinkState.PAUSED)):
            return
        self.sync_wanted = False
        self.sync_open = True
        self.sync_round += 1
        round_ = self.sync_round
        subscriber = self.subscriber

        def answered(done: Synced) -> None:
            if round_ == self.sync_round:
                self.sync_open = False
                if self.sync_timer is not None:
                    self.sync_timer.cancel()
                    self.sync_timer = None
                subscriber.synced(done, done.streams)
                if self.rebuild is not None and self.history:
                    for stream in subscriber.recovered:
                        self._reread(stream)

        link.sync(self.history, subscriber.round.high, subscriber.round.known, answered)
    def add_link(self, link: RedisLink) -> None:
        """Another link of this instance's (before ``start``): started, stopped and watched
        with the others."""
        link.watcher = self._session
        self.links.append(link)

    def listen(self, channel: bytes, heard: Callable[[bytes], None],
               subscribed: Callable[[], None]) -> None:
        """The subscriber takes ``channel`` too (before ``start``): each message goes to
        ``heard``; ``subscribed`` is told at each new subscription (what was said on the
        channel meanwhile was missed)."""
        self.subscriber.also[channel] = heard
        self.subscriber.subscribed.append(subscribed)

    def _session(self, link: RedisLink, up: bool) -> None:
        if up:
            self.up.add(link)
            for other in self.links:  # Redis is back: the others need not wait for their retry
                if other is not link:
                    other.safely("hurry", other.hurry)  # (its bug is its own)
            if self.apart and len(self.up) == len(self.links):
                self.apart = False
                self.together_since = time.monotonic()
                if self.told and self.on_links is not None:
                    self.told = False
                    self.on_links(True)
        else:
            self.up.discard(link)
            if not self.apart:
                self.apart = True
                # A link Redis takes and then refuses again (a reply it cannot take) comes and
                # goes every retry: one outage for the users, as for the log (link.STABLE).
                now = time.monotonic()
                if self.together_since is None or now - self.together_since >= STABLE:
                    self._tell_apart()
                else:  # told if this loss lasts STABLE seconds without a break
                    self.apart_since = now
                    self.loop.call_later(STABLE, lambda: self._tell_if_apart(now))

    def _tell_apart(self) -> None:
        self.told = True
        if self.on_links is not None:
            self.on_links(False)

    def _tell_if_apart(self, since: float) -> None:
        if self.apart and not self.told and self.apart_since == since:
            self._tell_apart()

    def start(self) -> None:
        for link in self.links:
            link.start()

    # -- the hub's hooks ------------------------------------------------------------------------

    def published(self, data: bytes, head: bytes, seq: int) -> None:
        self.publisher.publish(data, head, seq)

    def free(self) -> None:
        self.subscriber.unpause()

    def drain(self) -> None:
        for link in self.links:
            link.stop()

    def forced(self, reason: str) -> None:
        for link in self.links:
            link.abort(reason)

    def done(self) -> bool:
        return all(link.state == LinkState.CLOSED for link in self.links)

    def totals(self) -> dict[str, int]:
        return {
            "redis_gaps": self.subscriber.stream_gaps,
            "redis_skipped": self.subscriber.skipped,
            "redis_published": self.publisher.published,
            "redis_received": self.subscriber.received,
            "redis_dropped": self.publisher.dropped,
            "redis_missed": self.subscriber.missed,
            "redis_duplicates": self.subscriber.duplicates,
            "redis_oversize": self.subscriber.oversize,
        }
