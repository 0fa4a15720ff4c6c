"""One delivery association to a Storage SCP, as SCU, on a blocking socket: the far router's C-STORE sender.

The delivery pool (relay_router.accel.delivery) ran each association through pynetdicom, which keeps two
threads per association polling every millisecond (the DUL and the association's reactor) and sends a
data set only from a file. On the shared 2-core VM those threads took about half of router B's CPU during
a run of small objects, and every instance was written to a spool file only to be read back for it.

A :class:`StoreLink` is driven by the one worker thread that owns it, and does nothing between its calls:

* :meth:`open` connects, sends an A-ASSOCIATE-RQ built by pynetdicom's PDU classes
  (relay_router.dimse.scu) and reads the A-ASSOCIATE-AC with relay_router.ul.associate;
* :meth:`store` sends one C-STORE-RQ (command from a template, relay_router.dimse.fast.StoreRequests)
  and its data set, fragmented to the device's Maximum Length (relay_router.dimse.sender), from memory
  or from a file, then blocks until the C-STORE-RSP, read by relay_router.dimse.receiver (its fast path
  for the common response, pydicom for anything else);
* :meth:`release` (A-RELEASE-RQ, RP awaited for a bounded time) and :meth:`abort` end it.

Whatever is not a well-formed C-STORE-RSP to the request just sent (an A-ABORT, an A-RELEASE-RQ, a closed
socket, a timeout, a response to another Message ID, a malformed PDU) raises :class:`LinkLost`: the
association is aborted and closed, and the caller counts the attempt as a transient failure. Every length
the device sends is bounded before anything is read into memory.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from relay_router.dimse.errors import DimseError
from relay_router.dimse.fast import StoreAnswer, StoreRequests, store_answer
from relay_router.dimse.receiver import DimseReceiver
from relay_router.dimse.scu import associate_rq, split_part10
from relay_router.dimse.sender import DimseSender
from relay_router.ul.associate import parse_associate, with_abstract_syntaxes
from relay_router.ul.pdu import AbortSource, PduError, PduType, a_abort, a_release_rq, parse_reject

__all__ = ["LinkLost", "LinkRefused", "StoreLink", "MAX_PDU_RECEIVED", "file_dataset"]

log = logging.getLogger("relay_router.accel.delivery")

MAX_PDU_RECEIVED = 65536  # our Maximum Length: the device only sends us C-STORE-RSPs
MAX_CONTROL_PDU = 1024 * 1024  # an A-ASSOCIATE-AC with 128 contexts is a few KiB
RELEASE_TIMEOUT_S = 5.0
JOIN_BELOW = 1024 * 1024  # a data set this small goes out with its command in one send


class LinkRefused(Exception):
    """No association: the device could not be reached, rejected it, or answered with something else."""

    def __init__(self, detail: str, *, rejected: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.rejected = rejected


class LinkLost(Exception):
    """The association ended or broke while a C-STORE was under way (no answer for it)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class _Reader:
    """Whole PDUs from a blocking socket, each length bounded before it is read."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)

    def pdu(self, deadline: float) -> tuple[int, bytes]:
        header = self._exactly(6, deadline)
        pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
        limit = MAX_PDU_RECEIVED if pdu_type == PduType.P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            raise PduError(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds the {limit} this side accepts")
        return pdu_type, header + self._exactly(length, deadline)

    def _exactly(self, count: int, deadline: float) -> bytes:
        while len(self.buffer) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(max(65536, count - len(self.buffer)))
            if not chunk:
                raise ConnectionError("the device closed the connection")
            self.buffer += chunk
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data


class StoreLink:
    """An established association (see the module docstring); use from one thread."""

    def __init__(
        self,
        sock: socket.socket,
        contexts: dict[tuple[str, str], int],
        peer_max_pdu: int,
        *,
        called_ae: str,
        dimse_timeout: float,
    ) -> None:
        self._sock = sock
        self._reader = _Reader(sock)
        self.contexts = contexts  # accepted (SOP class, transfer syntax) -> presentation context ID
        self.accepted = frozenset(contexts)
        self.called_ae = called_ae
        self.dimse_timeout = dimse_timeout
        self._sender = DimseSender(peer_max_pdu)
        self._requests = StoreRequests()
        self._receiver = DimseReceiver({cid: pair for pair, cid in contexts.items()}, max_pdu_length=MAX_PDU_RECEIVED)
        self._message_id = 0
        self.open_ = True

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        pairs: Sequence[tuple[str, str]],
        *,
        calling_ae: str,
        called_ae: str,
        connect_timeout: float,
        dimse_timeout: float,
    ) -> StoreLink:
        """Associate, proposing one context per (SOP class, transfer syntax) pair (at most 128)."""
        if not 1 <= len(pairs) <= 128:
            raise ValueError("between 1 and 128 presentation contexts")
        proposed = [(2 * number + 1, sop_class, syntax) for number, (sop_class, syntax) in enumerate(pairs)]
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise LinkRefused(f"could not be reached ({exc.strerror or exc})") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one round trip per C-STORE-RSP
            request = associate_rq(calling_ae, called_ae, proposed, max_pdu_length=MAX_PDU_RECEIVED)
            sock.settimeout(connect_timeout)
            sock.sendall(request)
            pdu_type, pdu = _Reader(sock).pdu(time.monotonic() + connect_timeout)
            if pdu_type == PduType.ASSOCIATE_RJ:
                result, source, reason = parse_reject(pdu)
                raise LinkRefused(
                    f"rejected the association (result {result}, source {source}, reason {reason})", rejected=True
                )
            if pdu_type != PduType.ASSOCIATE_AC:
                raise LinkRefused(f"answered the A-ASSOCIATE-RQ with PDU type 0x{pdu_type:02X}")
            answer = with_abstract_syntaxes(parse_associate(pdu), parse_associate(request))
        except LinkRefused:
            _close(sock, abort=True)
            raise
        except (OSError, PduError, ValueError) as exc:
            _close(sock, abort=True)
            raise LinkRefused(f"association failed: {exc}") from None
        by_id = {context_id: (sop_class, syntax) for context_id, sop_class, syntax in proposed}
        contexts = {
            by_id[pc.id]: pc.id
            for pc in answer.accepted_contexts
            if pc.id in by_id and (not pc.transfer_syntaxes or pc.transfer_syntaxes[0] == by_id[pc.id][1])
        }
        return cls(sock, contexts, answer.max_pdu_length, called_ae=called_ae, dimse_timeout=dimse_timeout)

    # -- one C-STORE ---------------------------------------------------------------------------

    def store(
        self,
        sop_class_uid: str,
        transfer_syntax: str,
        sop_instance_uid: str,
        dataset: bytes | bytearray | memoryview | tuple[Path, int],
        *,
        move_originator_ae: str | None = None,
        move_originator_id: int | None = None,
    ) -> StoreAnswer:
        """Send one instance's data set (bytes, or a (file, offset) pair) and wait for its C-STORE-RSP."""
        if not self.open_:
            raise LinkLost("the association has ended")
        context_id = self.contexts.get((sop_class_uid, transfer_syntax))
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {sop_class_uid} in {transfer_syntax}")
        self._message_id = self._message_id % 0xFFFF + 1
        message_id = self._message_id
        command = self._requests.request(
            message_id,
            sop_class_uid,
            sop_instance_uid,
            move_originator_ae=move_originator_ae if move_originator_id is not None else None,
            move_originator_message_id=move_originator_id if move_originator_ae else None,
        )
        try:
            pdus = self._sender.encoded_command(context_id, command)
            if isinstance(dataset, tuple):
                self._send(pdus)
                path, offset = dataset
                self._send(self._sender.dataset(context_id, path, offset=offset))
            elif len(dataset) < JOIN_BELOW:
                self._sock.settimeout(self.dimse_timeout)
                self._sock.sendall(b"".join((*pdus, *self._sender.dataset(context_id, [cast(bytes, dataset)]))))
            else:
                self._send(pdus)
                self._send(self._sender.dataset(context_id, [cast(bytes, dataset)]))
            answer = self._answer(time.monotonic() + self.dimse_timeout)
        except LinkLost:
            self.abort()
            raise
        except (OSError, PduError, DimseError) as exc:  # timeouts, resets, malformed PDUs
            self.abort()
            raise LinkLost(f"{exc.__class__.__name__}: {exc}") from None
        if answer.command_field != 0x8001 or answer.message_id_responded != message_id:
            self.abort()
            raise LinkLost(
                f"{self.called_ae} answered Message ID {message_id} with command 0x{answer.command_field:04X} "
                f"for Message ID {answer.message_id_responded}"
            )
        return answer

    def _send(self, pdus: Iterable[bytes]) -> None:
        self._sock.settimeout(self.dimse_timeout)
        for pdu in pdus:
            self._sock.sendall(pdu)

    def _answer(self, deadline: float) -> StoreAnswer:
        while True:
            pdu_type, pdu = self._reader.pdu(deadline)
            if pdu_type == PduType.P_DATA_TF:
                for event in self._receiver.feed(pdu):
                    if getattr(event, "has_dataset", False):
                        raise LinkLost(f"{self.called_ae} sent a data set with its response")
                    answer = getattr(event, "answer", None)
                    if answer is not None:
                        return cast(StoreAnswer, answer)
                    command = getattr(event, "command", None)
                    if command is not None:
                        try:
                            return store_answer(command)
                        except ValueError as exc:
                            raise LinkLost(f"{self.called_ae} sent a malformed response: {exc}") from None
            elif pdu_type == PduType.ABORT:
                self._close()
                raise LinkLost(f"{self.called_ae} aborted the association")
            elif pdu_type == PduType.RELEASE_RQ:
                raise LinkLost(f"{self.called_ae} asked to release the association during a C-STORE")
            else:
                raise LinkLost(f"{self.called_ae} sent PDU type 0x{pdu_type:02X} during a C-STORE")

    # -- between C-STOREs ----------------------------------------------------------------------

    def usable(self) -> bool:
        """Still open and nothing arrived since the last answer (a device sends nothing unasked on a storage
        association: whatever is waiting is an A-ABORT, an A-RELEASE-RQ or the connection closing)."""
        if not self.open_:
            return False
        if self._reader.buffer:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def release(self) -> None:
        """A-RELEASE-RQ, then the RP (or anything else) for at most RELEASE_TIMEOUT_S; closed either way."""
        if not self.open_:
            return
        try:
            self._sock.settimeout(RELEASE_TIMEOUT_S)
            self._sock.sendall(a_release_rq())
            deadline = time.monotonic() + RELEASE_TIMEOUT_S
            while True:
                pdu_type, _ = self._reader.pdu(deadline)
                if pdu_type in (PduType.RELEASE_RP, PduType.ABORT):
                    break
        except (OSError, PduError):
            pass
        self._close()

    def abort(self) -> None:
        if self.open_:
            _close(self._sock, abort=True)
            self.open_ = False

    def _close(self) -> None:
        if self.open_:
            _close(self._sock, abort=False)
            self.open_ = False


def _close(sock: socket.socket, *, abort: bool) -> None:
    if abort:
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(a_abort(AbortSource.SERVICE_USER))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def file_dataset(path: Path) -> tuple[Path, int]:
    """A spool file as :meth:`StoreLink.store` takes it: the path and where its data set starts."""
    with open(path, "rb") as fp:
        return path, split_part10(fp)[1]
