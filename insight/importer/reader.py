"""A streaming reader of Chrome trace-event JSON (Kineto's ``{"traceEvents": [...], ...}`` or a bare array).

The file is never parsed as a whole. It is read in chunks of ``CHUNK`` decompressed bytes (gzip detected by
its magic bytes, not the file name); the ``traceEvents`` array is cut at an element boundary and each piece
is parsed by orjson as one small JSON array. A cut is a candidate ``}`` byte; the prefix up to it parses as
``[...]`` exactly when that ``}`` closes a top-level element (a ``}`` inside a string leaves the string open,
one closing a nested object leaves its parent open), so a bad candidate is just a parse error at the cut and
the next earlier ``}`` is tried. The other top-level keys (``deviceProperties``, ``distributedInfo``,
``baseTimeNanoseconds``, ...) are small values parsed where they stand, before or after the events.

With ``scan`` (``EventColumns.scan``, the Cython scanner of ``_scan.pyx``) most elements never become Python
objects: the scanner reads runs of whole elements from the buffer itself, and only where it declines an
element (or the JSON is malformed) does the orjson path above take over from that element on, which is also
where every error message comes from.

Memory: one chunk plus the events of one piece. Every problem is a ``MalformedTrace`` naming the file and the
byte offset (of the decompressed JSON; for a damaged gzip stream also the compressed offset).
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

import orjson

CHUNK = 2 << 20          # decompressed bytes read at a time
MAX_CANDIDATES = 4       # cut points tried before reading more data
MAX_VALUE = 64 << 20     # a top-level value other than traceEvents larger than this is an error
WS = b" \t\r\n"
ST_MORE = 1              # the scanner's status: the buffer ends inside an element (insight/importer/_scan.pyx)


class MalformedTrace(Exception):
    """A trace file that is not valid trace-event JSON. ``str(e)`` is one line naming the file and the offset."""

    def __init__(self, path, offset: int | None, message: str):
        self.path, self.offset, self.message = str(path), offset, message
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{self.path}{where}: {message}")


class BadEvent(Exception):
    """Raised by an event consumer for the ``index``-th event of the batch it was given."""

    def __init__(self, index: int, message: str):
        self.index, self.message = index, message
        super().__init__(message)


def _kind(b: int) -> str:
    c = chr(b)
    if c == '"':
        return "a string"
    if c in "-0123456789":
        return "a number"
    if c in "tf":
        return "a boolean"
    if c == "n":
        return "null"
    return f"not JSON (starts with {c!r})"


class TraceReader:
    """``for events in reader.batches(): ...`` yields lists of event objects (whatever JSON values the array
    holds); ``reader.header`` holds every other top-level key, complete once the batches are exhausted.

    ``consume(events)`` may raise ``BadEvent(k, msg)``: ``run(consume)`` turns it into a MalformedTrace at the
    byte offset of the k-th event of that batch."""

    def __init__(self, path: str | os.PathLike, chunk: int = CHUNK, progress: Callable[[int], None] | None = None,
                 scan: Callable | None = None):
        self.path = Path(path)
        self._scan = scan       # a fast path: scan(buf, pos) -> (status, end, batch or None), see events.scan
        self.chunk = int(chunk)
        self.header: dict = {}
        self.bare_array = False
        self.events = 0
        self._progress = progress
        self._raw = None
        self._f = None
        self._gz = False
        self._buf = b""
        self._pos = 0
        self._base = 0          # decompressed offset of _buf[0]
        self._eof = False
        # the last batch: (buffer, start, end, offset of the buffer), for error offsets
        self._region: tuple[bytes, int, int, int] | None = None

    # -- the byte stream ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def raw_offset(self) -> int:
        try:
            return self._raw.tell() if self._raw is not None else 0
        except (OSError, ValueError):
            return 0

    def _open(self) -> None:
        try:
            self._raw = open(self.path, "rb")
        except OSError as e:
            raise MalformedTrace(self.path, None, f"cannot open ({e.strerror or e})") from None
        magic = self._raw.read(2)
        self._raw.seek(0)
        self._gz = magic == b"\x1f\x8b"
        self._f = gzip.GzipFile(fileobj=self._raw, mode="rb") if self._gz else self._raw

    def close(self) -> None:
        for f in (self._f, self._raw):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001 - closing a damaged gzip stream may raise again
                pass

    def _read(self, n: int) -> bytes:
        try:
            data = self._f.read(n)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            what = "truncated gzip data" if isinstance(e, EOFError) else "corrupt gzip data"
            raise MalformedTrace(self.path, self._base + len(self._buf),
                                 f"{what} (compressed byte {self.raw_offset()}: {e})") from None
        if self._progress is not None:
            self._progress(self.raw_offset())
        return data

    def _fill(self, grow: bool = False) -> bool:
        """Drop the consumed bytes and read more; False at the end of the file."""
        if self._eof:
            return False
        if self._pos:
            self._base += self._pos
            self._buf = self._buf[self._pos:]
            self._pos = 0
        want = max(self.chunk, len(self._buf)) if grow else self.chunk
        data = self._read(want)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _peek(self) -> int | None:
        """The next non-whitespace byte (not consumed), None at the end of the file."""
        while True:
            buf, pos = self._buf, self._pos
            n = len(buf)
            while pos < n and buf[pos] in WS:
                pos += 1
            self._pos = pos
            if pos < n:
                return buf[pos]
            if not self._fill():
                return None

    def _expect(self, chars: bytes, what: str) -> int:
        c = self._peek()
        if c is None:
            raise MalformedTrace(self.path, self._base + self._pos, f"truncated JSON: the file ends where {what} "
                                 f"was expected")
        if c not in chars:
            raise MalformedTrace(self.path, self._base + self._pos, f"invalid JSON: {chr(c)!r} where {what} was "
                                 f"expected")
        self._pos += 1
        return c

    def _value(self, what: str):
        """Parse one small JSON value (a key, or a top-level value other than traceEvents) where it stands."""
        self._peek()
        dec = json.JSONDecoder()
        window = 1 << 16
        while True:
            piece = self._buf[self._pos:self._pos + window]
            whole = self._pos + len(piece) >= len(self._buf)  # the piece reaches the end of the buffer
            text = piece.decode("utf-8", "surrogateescape")
            try:
                obj, end = dec.raw_decode(text)
                used = len(text[:end].encode("utf-8", "surrogateescape"))
                if used < len(piece) or self._eof:  # (a number right at the end may go on in the next chunk)
                    self._pos += used
                    return obj
            except json.JSONDecodeError as e:
                if (whole and self._eof) or window > MAX_VALUE:
                    at = self._base + self._pos + len(text[:e.pos].encode("utf-8", "surrogateescape"))
                    if self._eof and whole:
                        raise MalformedTrace(self.path, at, f"truncated or invalid JSON in {what} ({e.msg})") from None
                    raise MalformedTrace(self.path, at, f"invalid JSON in {what} ({e.msg})") from None
            if whole:
                self._fill(grow=True)
            else:
                window *= 4

    # -- the document ---------------------------------------------------------------------------------
    def batches(self) -> Iterator[list]:
        self._open()
        try:
            c = self._peek()
            if c is None:
                raise MalformedTrace(self.path, 0, "empty file (expected trace-event JSON)")
            if c == 0xEF and self._buf[self._pos:self._pos + 3] == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark
                self._pos += 3
                c = self._peek()
            if c == ord("["):
                self.bare_array = True
                self._pos += 1
                yield from self._array(bare=True)
            elif c == ord("{"):
                self._pos += 1
                yield from self._object()
            else:
                raise MalformedTrace(self.path, self._base + self._pos,
                                     f"the top-level JSON value is {_kind(c)}; a trace is an object with "
                                     f"\"traceEvents\" or an array of events")
            if self._peek() is not None:
                raise MalformedTrace(self.path, self._base + self._pos, "unexpected data after the end of the JSON "
                                                                        "document")
        finally:
            self.close()

    def _object(self) -> Iterator[list]:
        seen_events = False
        if self._peek() == ord("}"):
            self._pos += 1
        else:
            while True:
                self._expect(b'"', "a key")
                self._pos -= 1
                key = self._value("a key")
                self._expect(b":", "':'")
                if key == "traceEvents":
                    c = self._peek()
                    if c != ord("["):
                        raise MalformedTrace(self.path, self._base + self._pos,
                                             "\"traceEvents\" is not an array" if c is not None else
                                             "truncated JSON: the file ends before the traceEvents array")
                    self._pos += 1
                    seen_events = True
                    yield from self._array(bare=False)
                else:
                    self.header[key] = self._value(f"the value of {key!r}")
                if self._expect(b",}", "',' or '}' after a top-level value") == ord("}"):
                    break
        if not seen_events:
            raise MalformedTrace(self.path, None, "no \"traceEvents\" array: not a Chrome/Kineto trace")

    def _array(self, bare: bool) -> Iterator[list]:
        first = True
        while True:
            c = self._peek()
            if c is None:
                if bare and not first:  # the trace-event format lets a streamed array end without its ']'
                    return
                raise MalformedTrace(self.path, self._base + self._pos, "truncated JSON: the file ends inside the "
                                     "traceEvents array (it is not closed)")
            if c == ord("]"):
                self._pos += 1
                return
            if not first:
                if c != ord(","):
                    raise MalformedTrace(self.path, self._base + self._pos, f"invalid JSON: {chr(c)!r} between "
                                                                            f"two events (expected ',' or ']')")
                self._pos += 1
                c = self._peek()
                if c is None and bare:
                    return
                if c is None:
                    raise MalformedTrace(self.path, self._base + self._pos, "truncated JSON: the file ends inside "
                                                                            "the traceEvents array")
            events = self._scanned() if self._scan is not None else None
            if events is None:
                events = self._piece()
            first = False
            self.events += len(events)
            yield events

    def _scanned(self):
        """The fast path: a batch of the whole elements the scanner takes from here (reading more while the
        buffer ends inside the first one), or None when the next element is for ``_piece`` (orjson; also for
        every error message)."""
        while True:
            status, end, batch = self._scan(self._buf, self._pos)
            if batch is not None:
                self._region = (self._buf, self._pos, end, self._base)
                self._pos = end
                return batch
            if status != ST_MORE or not self._fill(grow=True):
                return None

    def _piece(self) -> list:
        """Parse the longest run of whole elements in the buffer (at least one, reading more if needed)."""
        while True:
            buf, start = self._buf, self._pos
            end = len(buf)
            tried = 0
            while tried < MAX_CANDIDATES:
                cut = buf.rfind(b"}", start, end)
                if cut < 0:
                    break
                doc = b"[" + buf[start:cut + 1] + b"]"
                try:
                    events = orjson.loads(doc)
                except orjson.JSONDecodeError as e:
                    if "after document" in str(e):  # the array closed inside this piece: parse up to its ']'
                        head = doc if doc.isascii() else None
                        epos = e.pos if head is not None else len(
                            doc.decode("utf-8", "surrogateescape")[:e.pos].encode("utf-8", "surrogateescape"))
                        close = doc.rfind(b"]", 0, epos)
                        events = orjson.loads(doc[:close + 1])
                        self._region = (buf, start, start + close - 1, self._base)
                        self._pos = start + close - 1  # at the array's ']'
                        return events
                    if not self._at_cut(doc, e):
                        self._malformed_piece(buf[start:cut + 1], start)
                    end = cut
                    tried += 1
                    continue
                self._region = (buf, start, cut + 1, self._base)
                self._pos = cut + 1
                return events
            if not self._fill(grow=True):
                rest = self._buf[self._pos:]
                if rest.strip():
                    self._malformed_piece(rest, self._pos, at_end=True)
                raise MalformedTrace(self.path, self._base + len(self._buf), "truncated JSON: the file ends inside "
                                                                             "the traceEvents array")

    @staticmethod
    def _at_cut(doc: bytes, e: orjson.JSONDecodeError) -> bool:
        """Did parsing fail only because the cut was not an element boundary (the error is at the very end)?"""
        n = len(doc) if doc.isascii() else len(doc.decode("utf-8", "replace"))
        return e.pos >= n - 2

    def _malformed_piece(self, region: bytes, start: int, at_end: bool = False):
        """Raise a MalformedTrace at the first syntax error of ``region`` (bytes of the array's elements)."""
        text = region.decode("utf-8", "surrogateescape")
        try:
            json.loads("[" + text + "]")
            pos, msg = len(text), "truncated JSON: the file ends inside an event"
        except json.JSONDecodeError as e:
            pos = max(0, min(e.pos - 1, len(text)))
            truncated = at_end and pos >= len(text.rstrip()) - 1
            msg = "truncated JSON: the file ends inside an event" if truncated else f"invalid JSON ({e.msg})"
        offset = self._base + start + len(text[:pos].encode("utf-8", "surrogateescape"))
        raise MalformedTrace(self.path, offset, msg)

    def event_offset(self, index: int) -> int | None:
        """Byte offset of the ``index``-th event of the last batch (slow; for error messages only)."""
        if self._region is None:
            return None
        buf, a, b, base = self._region
        region, base = buf[a:b], base + a
        text = region.decode("utf-8", "surrogateescape")
        dec = json.JSONDecoder()
        pos, k = 0, 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if k == index or pos >= len(text):
                return base + len(text[:pos].encode("utf-8", "surrogateescape"))
            _, pos = dec.raw_decode(text, pos)
            k += 1

    def run(self, consume: Callable[[list], None]) -> None:
        """Feed every batch to ``consume``; a BadEvent becomes a MalformedTrace at that event's offset."""
        for events in self.batches():
            try:
                consume(events)
            except BadEvent as b:
                raise MalformedTrace(self.path, self.event_offset(b.index),
                                     f"event {self.events - len(events) + b.index}: {b.message}") from None
