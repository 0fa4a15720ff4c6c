"""Accelerated retrieval: the final C-MOVE response waits until the move's images are at their destination.

A workstation at this site asks a remote archive (site B) for a C-MOVE to one of this router's
`[[shared]]` devices with `accelerate = true`. The C-MOVE itself travels on a transparent
association (this router is one end of its encryption and sees the cleartext P-DATA); the
archive's C-STORE sub-operations come back over the accelerated route: router B answers them from
its spool, ships them, and this router's delivery pool stores them into the device. Without a
hold the archive's final C-MOVE-RSP would overtake the images, and movescu would report success
for images still on their way (or never delivered).

So, on such an association (`MoveWatch`, one per outbound transparent association, fed the
cleartext PDUs by relay_router.association):

* a C-MOVE-RQ whose Move Destination is an accelerated shared device here registers the move in the
  `MoveRegistry` under (partner site, calling AE title, Message ID);
* the sub-operations that arrive (relay_router.accel.receive: INSTANCE records carry the Move
  Originator AE Title and Message ID, which router B translated back into this site's titles) and
  their final delivery outcomes (relay_router.accel.runtime, from the delivery pool) are counted
  per move, once per SOP Instance UID;
* pending C-MOVE-RSPs (FF00) pass unchanged: their counts are the archive's (images handed to
  router B), as before;
* the final C-MOVE-RSP is held until as many sub-operations have a final outcome here as the
  archive counted completed or warning, or until `[accelerate] move_hold_max_s` (then the rest are
  reported failed, with a log line saying so), and its counts and status are rewritten to what the
  destination answered: Completed = stored with 0000 (or 0111, already there), Warning = Bxxx,
  Failed = the archive's own failures + the destination's refusals + the unconfirmed. Status
  (PS3.4 C.4.2.3.1): 0000 with no failure or warning, B000 with some, A702 when every
  sub-operation failed (DCMTK's choice for "all failed"); the Failed SOP Instance UID List
  (0008,0058) names what failed. A final status other than 0000/B000/A702 (Cancel FE00, a refusal)
  keeps its status; only its counts change.

The registry is bounded (moves held at once, sub-operations remembered per move) and a final
response is never held past the ceiling. Everything here runs on the event loop except
`MoveRegistry.finished`, which the delivery pool's worker threads call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from relay_common.files import write_private
from relay_router.dimse import (
    CommandField,
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseError,
    DimseReceiver,
    DimseSender,
    c_move_rsp,
    encode_dataset,
)
from relay_router.ul.pdu import PduType

if TYPE_CHECKING:
    from relay_router.config import RouterConfig

__all__ = [
    "MoveKey",
    "MoveRegistry",
    "MoveWatch",
    "PartnerSenders",
    "Tally",
    "final_counts",
    "partner_originator",
]

log = logging.getLogger("relay_router.accel.moves")

MAX_MOVES = 1000  # moves held at once; beyond, a new move's final response passes as the archive sent it
MAX_SUBOPS = 100_000  # sub-operations remembered per move (a study of 100 000 instances is far beyond real ones)
MAX_HELD_RESPONSE = 1024 * 1024  # bytes of a final response (its Failed SOP Instance UID List) held to rewrite
PENDING, SUCCESS, WARNING_SUBOPS, ALL_FAILED, CANCEL = 0xFF00, 0x0000, 0xB000, 0xA702, 0xFE00
_PDU_HEADER = 6
# While a final response is held, the requester gets a pending C-MOVE-RSP this often (with the counts so
# far): a workstation with a DIMSE timeout would otherwise give up on a long delivery.
PENDING_EVERY_S = 10.0


@dataclass(frozen=True)
class MoveKey:
    """A move as its sub-operations name it: the partner site they come from, the Move Originator AE Title
    (the requester's title at this site) and the C-MOVE-RQ's Message ID."""

    site: str
    originator: str
    message_id: int


@dataclass
class _Move:
    key: MoveKey
    destination: str
    started: float
    arrived: set[str] = field(default_factory=set)  # SOP Instance UIDs received here for this move
    results: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> the destination's final status
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    transparent: bool = False  # the partner relayed sub-operations to the destination transparently meanwhile


@dataclass(frozen=True)
class Tally:
    """What the destination answered for the sub-operations of one move, when the final response goes."""

    completed: int
    warning: int
    failed: int
    failed_uids: tuple[str, ...]
    unconfirmed: int  # counted in `failed`: no final outcome within move_hold_max_s


def _delivered(status: int) -> bool:
    return status in (0x0000, 0x0111) or status & 0xF000 == 0xB000


def final_counts(expected: int, results: Mapping[str, int], arrived: Iterable[str]) -> Tally:
    """The destination's outcomes of `expected` sub-operations (pure): results beyond `expected` are not
    counted twice, the ones missing are failed (unconfirmed)."""
    completed = warning = failed = 0
    failed_uids: list[str] = []
    for uid, status in list(results.items())[:expected]:
        if status in (0x0000, 0x0111):
            completed += 1
        elif _delivered(status):
            warning += 1
        else:
            failed += 1
            failed_uids.append(uid)
    unconfirmed = max(0, expected - completed - warning - failed)
    failed_uids += [uid for uid in arrived if uid not in results][:unconfirmed]
    return Tally(completed, warning, failed + unconfirmed, tuple(failed_uids), unconfirmed)


class MoveRegistry:
    """The moves in flight whose final response this router holds (see the module docstring)."""

    def __init__(
        self,
        hold_max_s: float,
        *,
        max_moves: int = MAX_MOVES,
        max_subops: int = MAX_SUBOPS,
    ) -> None:
        self.hold_max_s = hold_max_s
        self.max_moves = max_moves
        self.max_subops = max_subops
        self._moves: dict[MoveKey, _Move] = {}
        self._lock = threading.Lock()  # finished() comes from the delivery pool's threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self.held_total = 0  # final responses held (and released) since the start
        # How each hold ended (relay_router_accel_move_holds_total): every sub-operation confirmed here; the
        # ceiling with some unconfirmed; the sub-operations went transparently (the archive's answer passed).
        self.confirmed_total = 0
        self.timed_out_total = 0
        self.transparent_total = 0
        self.unconfirmed_total = 0  # sub-operations reported failed in a final response because unconfirmed

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def watch(
        self, site: str, calling_ae: str, accelerated: Callable[[str], str | None], association_id: str = ""
    ) -> MoveWatch:
        """`accelerated(destination)`: which of our accelerated [[shared]] devices a Move Destination AE title
        (the partner's title for it) names, if `site` sends to it the accelerated way; else None."""
        return MoveWatch(self, site=site, calling_ae=calling_ae, accelerated=accelerated, association_id=association_id)

    # -- the move's life (event loop) ---------------------------------------------------------------
    def begin(self, key: MoveKey, destination: str) -> bool:
        """Register a C-MOVE leaving for `key.site`; False (not held) when it cannot be told apart or the
        registry is full."""
        with self._lock:
            if key in self._moves:
                log.warning(
                    "a C-MOVE from %r with Message ID %d to %s is already in flight: the second one's final "
                    "response is not held (its sub-operations cannot be told apart)",
                    key.originator,
                    key.message_id,
                    key.site,
                )
                return False
            if len(self._moves) >= self.max_moves:
                log.warning(
                    "%d C-MOVEs held already: the final response of the one from %r (Message ID %d) is passed "
                    "as the archive sends it",
                    len(self._moves),
                    key.originator,
                    key.message_id,
                )
                return False
            self._moves[key] = _Move(key, destination, time.monotonic())
        log.info(
            "C-MOVE from %r (Message ID %d) to %s at %s: its final response waits for delivery here",
            key.originator,
            key.message_id,
            destination,
            key.site,
        )
        return True

    def end(self, key: MoveKey) -> None:
        with self._lock:
            self._moves.pop(key, None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._moves)

    # -- sub-operations ----------------------------------------------------------------------------
    def _move_for(self, key: MoveKey, destination: str | None) -> _Move | None:
        """The held move `key`, if `destination` (the device a sub-operation is for) is its destination.

        Requesters reuse Message IDs (movescu sends 1 every time): a sub-operation of an earlier move with
        the same key that ends late (its hold timed out) must not count for the next one, which goes to
        another device. Caller holds _lock."""
        move = self._moves.get(key)
        if move is None or (destination is not None and destination != move.destination):
            return None
        return move

    def arrived(self, key: MoveKey, sop_instance: str, destination: str | None = None) -> None:
        """An INSTANCE of the move reached this router (event loop)."""
        with self._lock:
            move = self._move_for(key, destination)
            if move is not None and len(move.arrived) < self.max_subops:
                move.arrived.add(sop_instance)

    def finished(self, key: MoveKey, sop_instance: str, status: int, destination: str | None = None) -> None:
        """A sub-operation's final outcome here: the destination's C-STORE status, or the refusal (any thread)."""
        with self._lock:
            move = self._move_for(key, destination)
            if move is None:
                return
            if sop_instance not in move.results and len(move.results) >= self.max_subops:
                return
            move.results[sop_instance] = status
            if len(move.arrived) < self.max_subops:
                move.arrived.add(sop_instance)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(move.changed.set)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

    async def settle(
        self,
        key: MoveKey,
        expected: int,
        progress: Callable[[Tally, int], Awaitable[None]] | None = None,
        every_s: float = PENDING_EVERY_S,
    ) -> Tally | None:
        """Wait until `expected` sub-operations of the move have a final outcome here, at most `hold_max_s` from
        now. `progress(counts so far, remaining)` is awaited every `every_s` while waiting (pending responses).
        None: the sub-operations went transparently (`transparent_seen`): the archive's answer is the truth."""
        with self._lock:
            move = self._moves.get(key)
        if move is None:
            return Tally(0, 0, expected, (), expected)
        now = time.monotonic()
        deadline, next_progress = now + self.hold_max_s, now + every_s
        self.held_total += 1
        while True:
            with self._lock:
                done = len(move.results)
                results = dict(move.results) if progress is not None else {}
            if done >= expected or move.transparent:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            if progress is not None and now >= next_progress:
                next_progress = now + every_s
                partial = final_counts(done, results, ())
                await progress(partial, expected - done)
                continue
            move.changed.clear()
            wake = min(deadline, next_progress) if progress is not None else deadline
            try:
                await asyncio.wait_for(move.changed.wait(), max(0.0, min(wake - now, 5.0)))
            except TimeoutError:
                pass
        if move.transparent:
            self.transparent_total += 1
            log.info(
                "C-MOVE from %r (Message ID %d): %s relayed sub-operations to %s transparently; the final "
                "response passes as the archive sent it",
                key.originator,
                key.message_id,
                key.site,
                move.destination,
            )
            return None
        with self._lock:
            tally = final_counts(expected, dict(move.results), sorted(move.arrived))
        if not tally.unconfirmed:
            self.confirmed_total += 1
        else:
            self.timed_out_total += 1
            self.unconfirmed_total += tally.unconfirmed
            log.warning(
                "C-MOVE from %r (Message ID %d) to %s: %d of %d sub-operations not confirmed by %s within "
                "move_hold_max_s (%.0f s); reported failed in the final response",
                key.originator,
                key.message_id,
                key.site,
                tally.unconfirmed,
                expected,
                move.destination,
                self.hold_max_s,
            )
        return tally

    def transparent_seen(self, site: str, destination: str) -> None:
        """`site` relayed an association to `destination` transparently: sub-operations of moves held for that
        pair may come that way, already answered by the destination to the archive, and would never arrive
        here as instances. Such a hold ends now and the archive's final response passes as it is."""
        with self._lock:
            moves = [m for m in self._moves.values() if m.key.site == site and m.destination == destination]
            for move in moves:
                move.transparent = True
        for move in moves:
            move.changed.set()

    def status(self) -> dict[str, int]:
        return {
            "held": self.in_flight(),
            "released": self.held_total,
            "timed_out": self.timed_out_total,
            "unconfirmed_subops": self.unconfirmed_total,
        }


class PartnerSenders:
    """Which partner sites send to which of our devices the accelerated way, and under which title (persisted).

    A near router accepts sub-operations itself only once it has learned the device's capabilities,
    which it learns from a transfer to this router; before that it relays them transparently, and a
    held final response would wait for images that never come the accelerated way. So a move is held
    only for a (site, device) seen here (kept across restarts, as the near router keeps what it
    learned). The near router's HELLO also names its own title for the device: the archive's Move
    Destination, which is that title, is matched to our device through it.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._titles: dict[tuple[str, str], str] = {}  # (site, the site's title for the device) -> our device
        try:
            loaded = json.loads(path.read_text())
            for item in loaded[: self.MAX_ENTRIES]:
                site, device, title = (item + [item[-1]])[:3]  # [site, device, title]
                self._titles[(str(site), str(title))] = str(device)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, IndexError) as exc:
            log.warning("%s unreadable (%s): moves are held again once each partner's transfer is seen", path, exc)

    def device_for(self, site: str, title: str) -> str | None:
        """Our device that `site` reaches the accelerated way under `title`, if any."""
        return self._titles.get((site, title))

    def add(self, site: str, device: str, title: str | None = None) -> None:
        key = (site, title or device)
        if self._titles.get(key) == device or len(self._titles) >= self.MAX_ENTRIES:
            return
        self._titles[key] = device
        self._save(f"cannot record {site}'s accelerated transfers into {device}")

    def discard(self, site: str, device: str) -> None:
        """`site` relayed an association to `device` transparently: it may not send the accelerated way (any
        more): its moves are not held until its next accelerated transfer."""
        keys = [key for key, ours in self._titles.items() if key[0] == site and ours == device]
        for key in keys:
            del self._titles[key]
        if keys:
            self._save(f"cannot forget {site}'s accelerated transfers into {device}")

    def _save(self, what: str) -> None:
        entries = sorted([site, device, title] for (site, title), device in self._titles.items())
        try:
            write_private(self.path, json.dumps(entries))
        except OSError as exc:
            log.warning("%s in %s: %s", what, self.path, exc)


def partner_originator(config: RouterConfig, site: str, originator: str) -> str:
    """The Move Originator AE Title in `site`'s own namespace (near router, before shipping a sub-operation).

    The archive names the calling AE title it saw, which is this router's local title for the requester
    when a `[[remote]]` entry exposes it under another name (relay_router.inbound rewrites the calling
    title to the alias); the far router matches by the requester's own title."""
    for remote in config.remote:
        if remote.ae_title == originator and remote.site == site:
            return remote.remote_ae_title or remote.ae_title
    return originator


def move_fields(meta: Mapping[str, str]) -> tuple[str | None, int | None]:
    """The Move Originator pair a spool entry's meta carries (relay_router.accel.acceptor), both or neither."""
    ae, text = meta.get("move_originator_ae", "").strip(), meta.get("move_originator_id", "")
    if not ae or not text.isdigit() or not 0 < int(text) <= 0xFFFF:
        return None, None
    return ae, int(text)


# -- the watch on one transparent association --------------------------------------------------------


@dataclass
class _Message:
    """One DIMSE message coming back to the requester: its PDVs until it is known whether it is held."""

    context_id: int
    pdvs: list[tuple[int, int, bytes]] = field(default_factory=list)
    decided: bool = False
    key: MoveKey | None = None  # a final C-MOVE-RSP of a held move
    command: Dataset | None = None
    dataset: bytearray = field(default_factory=bytearray)
    complete: bool = False


class MoveWatch:
    """C-MOVEs on one outbound transparent association (see the module docstring).

    `leaving(data)` observes what the requester sends (never changes it); `arriving(data)` returns
    what to send the requester instead of `data`, awaiting the delivery of a held move's images
    when `data` completes its final response. A parsing problem stops the watch (logged): the bytes
    then pass unchanged, as on any transparent route.
    """

    def __init__(
        self,
        registry: MoveRegistry,
        *,
        site: str,
        calling_ae: str,
        accelerated: Callable[[str], str | None],
        association_id: str = "",
    ) -> None:
        self.registry = registry
        self.accelerated = accelerated
        self.site = site
        self.calling_ae = calling_ae.strip()
        self.extra = {"assoc": association_id}
        self.contexts: Callable[[], Mapping[int, tuple[str, str]] | None] = lambda: None
        self.max_pdu: Callable[[], int] = lambda: 0  # the requester's Maximum Length (PS3.8 D.1)
        # Writes to the requester at once (the association's): what came before a held response, and the
        # pending responses sent while it is held. None: nothing is sent until the final response.
        self.send_local: Callable[[bytes], Awaitable[None]] | None = None
        self.pending_every_s = PENDING_EVERY_S
        self._moves: dict[int, MoveKey] = {}  # Message ID -> held move
        self._out = DimseReceiver({})  # requester -> archive
        self._out_buffer = bytearray()
        self._in_buffer = bytearray()
        self._in: DimseReceiver | None = None
        self._current: _Message | None = None
        self._broken = False

    def close(self) -> None:
        """The association ended: its moves are forgotten (a held response has nobody to go to)."""
        for key in self._moves.values():
            self.registry.end(key)
        self._moves.clear()

    def _stop(self, why: str) -> None:
        if not self._broken:
            log.warning("C-MOVE watch stopped (responses pass unchanged): %s", why, extra=self.extra)
        self._broken = True

    # -- requester -> archive ------------------------------------------------------------------
    def leaving(self, data: bytes) -> None:
        if self._broken:
            return
        if not self._out.contexts:
            contexts = self.contexts()
            if not contexts:
                return  # the A-ASSOCIATE-RQ itself
            if not any(_is_move(abstract) for abstract, _ in contexts.values()):
                self._broken = True  # no C-MOVE possible here: nothing to follow, the bytes pass untouched
                return
            self._out = DimseReceiver(contexts)
        try:
            for pdu in _pdus(data, self._out_buffer):
                if pdu[0] != PduType.P_DATA_TF:
                    continue
                for event in self._out.feed(pdu):
                    if isinstance(event, CommandReceived) and event.command_field == CommandField.C_MOVE_RQ:
                        self._request(event.command)
        except DimseError as exc:
            self._stop(f"cannot follow the requester's DIMSE messages: {exc}")

    def _request(self, command: Dataset) -> None:
        destination = str(command.get("MoveDestination", "")).strip()
        message_id = int(command.get("MessageID", 0))
        device = self.accelerated(destination) if destination else None
        if device is None:
            return
        key = MoveKey(self.site, self.calling_ae, message_id)
        previous = self._moves.pop(message_id, None)
        if previous is not None:
            self.registry.end(previous)
        if self.registry.begin(key, device):
            self._moves[message_id] = key

    # -- archive -> requester ------------------------------------------------------------------
    async def arriving(self, data: bytes) -> bytes:
        if self._broken or (not self._moves and self._current is None and not self._in_buffer):
            self._in = None  # not following: a new receiver starts at the next message boundary
            return data
        if self._in is None:
            contexts = self.contexts()
            if not contexts:
                return data
            self._in = DimseReceiver(contexts)
        out: list[bytes] = []
        try:
            for pdu in _pdus(data, self._in_buffer):
                if pdu[0] != PduType.P_DATA_TF:
                    if self._current is not None and self._current.key is not None:
                        self.registry.end(self._current.key)
                    self._current = None  # an abort or release mid-message: what was held cannot be sent
                    out.append(pdu)
                    continue
                await self._pdata(pdu, out)
        except (DimseError, ValueError) as exc:
            self._stop(f"cannot follow the archive's DIMSE messages: {exc}")
            held, self._current = self._current, None
            if held is not None:  # sent as it came
                if held.key is not None:
                    self.registry.end(held.key)
                out += [_pdu(cid, control, fragment) for cid, control, fragment in held.pdvs]
            out.append(bytes(self._in_buffer))
            self._in_buffer.clear()
        return b"".join(out)

    async def _pdata(self, pdu: bytes, out: list[bytes]) -> None:
        """Append to `out` what this PDU lets go to the requester now (awaiting a held move's delivery)."""
        assert self._in is not None
        earlier = len(self._current.pdvs) if self._current is not None else 0  # PDVs held from earlier PDUs
        touched: list[_Message] = []
        for context_id, control, fragment in _pdvs(pdu):
            if self._current is None:
                self._current = _Message(context_id)
            message = self._current
            if not touched or touched[-1] is not message:
                touched.append(message)
            message.pdvs.append((context_id, control, fragment))
            for event in self._in.receive_pdv(context_id, control, fragment):
                if isinstance(event, CommandReceived):
                    self._classify(message, event)
                    if not event.has_dataset:
                        message.complete = True
                        self._current = None
                elif isinstance(event, DatasetChunk) and message.key is not None:
                    message.dataset += event.data
                    if len(message.dataset) > MAX_HELD_RESPONSE:
                        raise ValueError(f"a final C-MOVE-RSP identifier over {MAX_HELD_RESPONSE} bytes")
                elif isinstance(event, DatasetComplete):
                    message.complete = True
                    self._current = None
        if earlier == 0 and all(m.decided and m.key is None for m in touched):
            for message in touched:
                message.pdvs.clear()
            out.append(pdu)  # nothing held in this PDU: it goes as it came, byte for byte
            return
        for message in touched:
            if not message.decided:
                continue  # its command set is not complete: kept until it is
            if message.key is None:
                out += [_pdu(cid, control, fragment) for cid, control, fragment in message.pdvs]
                message.pdvs.clear()
            elif message.complete:
                if self.send_local is not None and out:  # what came before goes before any pending response
                    await self.send_local(b"".join(out))
                    out.clear()
                out += await self._release(message)

    def _classify(self, message: _Message, event: CommandReceived) -> None:
        message.decided = True
        message.command = event.command
        if event.command_field != CommandField.C_MOVE_RSP:
            return
        status = int(event.command.get("Status", SUCCESS))
        message_id = int(event.command.get("MessageIDBeingRespondedTo", 0))
        if status == PENDING or status == 0xFF01:
            return
        key = self._moves.pop(message_id, None)
        if key is not None:
            message.key = key

    def _pending_sender(self, message: _Message, archive_failed: int) -> Callable[[Tally, int], Awaitable[None]] | None:
        """A pending C-MOVE-RSP (FF00) with the counts so far, for the requester while the final one is held."""
        send = self.send_local
        if send is None:
            return None
        command = message.command
        assert command is not None

        async def pending(tally: Tally, remaining: int) -> None:
            rsp = c_move_rsp(
                int(command.get("MessageIDBeingRespondedTo", 0)),
                str(command.get("AffectedSOPClassUID", "")),
                PENDING,
                completed=min(tally.completed, 0xFFFF),
                failed=min(archive_failed + tally.failed, 0xFFFF),
                warning=min(tally.warning, 0xFFFF),
                remaining=min(remaining, 0xFFFF),
            )
            await send(b"".join(DimseSender(self.max_pdu()).message(message.context_id, rsp)))

        return pending

    async def _release(self, message: _Message) -> list[bytes]:
        """The held final response, once the move's images have their outcome here, with the true counts."""
        key, command = message.key, message.command
        assert key is not None and command is not None and self._in is not None
        as_received = [_pdu(cid, control, fragment) for cid, control, fragment in message.pdvs]
        message.pdvs.clear()
        syntax = self._in.contexts[message.context_id][1]
        original = _decode(bytes(message.dataset), syntax) if message.dataset else None
        completed = int(command.get("NumberOfCompletedSuboperations", 0) or 0)
        warning = int(command.get("NumberOfWarningSuboperations", 0) or 0)
        failed = int(command.get("NumberOfFailedSuboperations", 0) or 0)
        status = int(command.get("Status", SUCCESS))
        try:
            tally = await self.registry.settle(
                key, completed + warning, self._pending_sender(message, failed), self.pending_every_s
            )
        finally:
            self.registry.end(key)
        if tally is None:
            return as_received
        try:
            answer = rewrite_final(command, status, failed, tally, original)
            identifier = None if answer.identifier is None else encode_dataset(answer.identifier, syntax)
            pdus = list(DimseSender(self.max_pdu()).message(message.context_id, answer.command, identifier))
        except Exception as exc:  # a bug or an odd archive must not cost the requester its final response
            log.error(
                "C-MOVE from %r (Message ID %d): cannot rewrite the final response (%s); sent as the archive gave it",
                key.originator,
                key.message_id,
                exc,
                extra=self.extra,
            )
            return as_received
        log.info(
            "C-MOVE from %r (Message ID %d): final response 0x%04X -> 0x%04X; completed %d, warning %d, failed %d "
            "(the archive said %d/%d/%d)",
            key.originator,
            key.message_id,
            status,
            answer.status,
            tally.completed,
            tally.warning,
            answer.failed,
            completed,
            warning,
            failed,
            extra=self.extra,
        )
        return pdus


@dataclass(frozen=True)
class FinalAnswer:
    command: Dataset
    identifier: Dataset | None
    status: int
    failed: int


def rewrite_final(
    command: Dataset, status: int, archive_failed: int, tally: Tally, original: Dataset | None
) -> FinalAnswer:
    """The final C-MOVE-RSP with the destination's outcomes (pure; see the module docstring)."""
    failed = min(0xFFFF, archive_failed + tally.failed)
    if status in (SUCCESS, WARNING_SUBOPS, ALL_FAILED):
        if failed == 0 and tally.warning == 0:
            status = SUCCESS
        elif tally.completed + tally.warning == 0:
            status = ALL_FAILED  # PS3.4 C.4.2.3.1: every sub-operation failed
        else:
            status = WARNING_SUBOPS
    answer = c_move_rsp(
        int(command.get("MessageIDBeingRespondedTo", 0)),
        str(command.get("AffectedSOPClassUID", "")),
        status,
        completed=min(tally.completed, 0xFFFF),
        failed=failed,
        warning=min(tally.warning, 0xFFFF),
    )
    identifier: Dataset | None = None
    uids = _uid_list(original.get("FailedSOPInstanceUIDList")) if original is not None else []
    uids += [uid for uid in tally.failed_uids if uid not in uids]
    if status != SUCCESS and uids:
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = uids[:10000]
    elif original is not None and status != SUCCESS:
        identifier = original
    if identifier is not None:
        answer.CommandDataSetType = 0x0001
    return FinalAnswer(answer, identifier, status, failed)


def _is_move(sop_class: str) -> bool:
    """A Query/Retrieve MOVE SOP class (PS3.4 C.6: "... Information Model - MOVE")."""
    return UID(sop_class).name.endswith("- MOVE")


def _uid_list(value: object) -> list[str]:
    """A UI value as a list: pydicom gives a single value as a str, several as a MultiValue."""
    if not value:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[attr-defined]


def _decode(data: bytes, transfer_syntax: str) -> Dataset | None:
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    try:
        return read_dataset(BytesIO(data), implicit, little)
    except Exception:  # a malformed identifier from the archive: its list is lost, the counts are not
        log.warning("the archive's final C-MOVE-RSP identifier is unreadable; its Failed SOP Instance UID List is lost")
        return None


def _pdus(data: bytes, buffer: bytearray) -> list[bytes]:
    """Whole PDUs from `buffer` + `data` (what is left of a partial PDU stays in `buffer`)."""
    buffer += data
    out: list[bytes] = []
    pos = 0
    while len(buffer) - pos >= _PDU_HEADER:
        end = pos + _PDU_HEADER + int.from_bytes(buffer[pos + 2 : pos + 6], "big")
        if len(buffer) < end:
            break
        out.append(bytes(buffer[pos:end]))
        pos = end
    del buffer[:pos]
    return out


def _pdvs(pdu: bytes) -> list[tuple[int, int, bytes]]:
    """The PDV items of a P-DATA-TF PDU (PS3.8 9.3.5.1)."""
    items: list[tuple[int, int, bytes]] = []
    pos, end = _PDU_HEADER, len(pdu)
    while pos < end:
        if pos + 6 > end:
            raise ValueError("a PDV item header does not fit its P-DATA-TF PDU (PS3.8 9.3.5.1)")
        length = int.from_bytes(pdu[pos : pos + 4], "big")
        if length < 2 or pos + 4 + length > end:
            raise ValueError(f"PDV item length {length} does not fit its P-DATA-TF PDU (PS3.8 9.3.5.1)")
        items.append((pdu[pos + 4], pdu[pos + 5], pdu[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return items


def _pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    item = len(fragment) + 2
    return (
        bytes((PduType.P_DATA_TF, 0))
        + (item + 4).to_bytes(4, "big")
        + item.to_bytes(4, "big")
        + bytes((context_id, control))
        + fragment
    )
