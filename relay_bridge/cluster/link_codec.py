"""The replica link's framing, sans-IO: bytes in, frames out (relay_bridge.cluster.link does the I/O).

A link is one mutual-TLS TCP connection that carries one forwarded association between two
replicas. On it every message is a frame: a 4-byte big-endian length, then that many bytes.

- The origin's first frame is the **header**: `MAGIC`, then the initiating site and the origin
  replica's id, each as one length byte and ASCII text (what the Forward call carried as metadata).
  Its second frame is the association's Open (a serialized relay.v1.Frame), read within the
  first-message timeout and size limit, as on the Forward call.
- Then relay.v1 frames both ways, as the opaque bytes they arrived as.
- The length `END_MARK` (0xFFFFFFFF, never a frame's length) is **end**: the sender has nothing
  more to send (grpc's done_writing, or the end of the holder's handler). An empty frame is an
  empty frame, carried as such. A connection that closes without it was cut: the association is
  aborted, as when a Forward call fails.

Every length is checked against the maximum before anything is buffered: a peer cannot make the
decoder hold more than one maximal frame plus one read.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"RLK1"  # relay link, version 1
LENGTH_BYTES = 4
END_MARK = 0xFFFFFFFF
END = None  # the end mark, as `FrameDecoder.feed` returns it


class LinkProtocolError(Exception):
    """The peer broke the link's framing; the connection is closed (the association, if any, aborted)."""


def encode(frame: bytes) -> bytes:
    """The length prefix of `frame` (the caller writes it and the frame: no copy of the payload)."""
    if len(frame) >= END_MARK:
        raise ValueError("a link frame is shorter than 4 GiB")
    return len(frame).to_bytes(LENGTH_BYTES, "big")


END_FRAME = END_MARK.to_bytes(LENGTH_BYTES, "big")


class FrameDecoder:
    """Splits the received byte stream into frames, however it was cut into reads."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes | None]:
        """The frames completed by `data` (`END` for the end mark). Raises LinkProtocolError."""
        self._buffer += data
        frames: list[bytes | None] = []
        buffer = self._buffer
        start = 0
        with memoryview(buffer) as view:  # one copy per frame, out of the buffer
            while len(buffer) - start >= LENGTH_BYTES:
                size = int.from_bytes(view[start : start + LENGTH_BYTES], "big")
                if size == END_MARK:
                    start += LENGTH_BYTES
                    frames.append(END)
                    continue
                if size > self._max:
                    raise LinkProtocolError(f"a frame of {size} bytes exceeds the limit of {self._max}")
                if len(buffer) - start - LENGTH_BYTES < size:
                    break
                start += LENGTH_BYTES
                frames.append(bytes(view[start : start + size]))
                start += size
        if start:
            del buffer[:start]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held (0 at a frame boundary)."""
        return len(self._buffer)


@dataclass(frozen=True)
class Header:
    """Who forwards: the initiating site (authenticated by the origin replica) and the origin replica."""

    from_site: str
    origin: str

    def encode(self) -> bytes:
        parts = [MAGIC]
        for value in (self.from_site, self.origin):
            raw = value.encode("ascii")
            if len(raw) > 255:
                raise ValueError("header fields are at most 255 bytes")
            parts += [bytes([len(raw)]), raw]
        return b"".join(parts)

    @classmethod
    def decode(cls, frame: bytes) -> Header:
        """Raises LinkProtocolError on anything but a well-formed header (the fields are validated by the caller)."""
        if not frame.startswith(MAGIC):
            raise LinkProtocolError("the first frame is not a link header")
        fields: list[str] = []
        at = len(MAGIC)
        for _ in range(2):
            if at >= len(frame):
                raise LinkProtocolError("the link header is truncated")
            size = frame[at]
            value = frame[at + 1 : at + 1 + size]
            if len(value) != size:
                raise LinkProtocolError("the link header is truncated")
            try:
                fields.append(value.decode("ascii"))
            except UnicodeDecodeError:
                raise LinkProtocolError("the link header is not ASCII") from None
            at += 1 + size
        if at != len(frame):
            raise LinkProtocolError("the link header has trailing bytes")
        return cls(fields[0], fields[1])
