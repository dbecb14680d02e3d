"""Is a tar shard complete? ``tarfile`` cannot say.

tarfile ends an archive at the first block it cannot read as a header: a block cut short, a block
of garbage, a single zero block. It raises only when that happens at byte 0, so a shard cut in the
middle reads as a shorter shard without any error. ``TarCheck`` follows the block structure of the
bytes as they go by (it never needs to seek, so it works on pipes, HTTP and fsspec streams) and says
at the end whether the archive ended the way a tar must: two zero blocks, then nothing but zero
padding. ``CheckedStream`` feeds it from a shard's byte stream (decompressing gzip/bz2/xz);
``check_local_tar`` walks a local file's headers, seeking over member data. ``shards`` uses both.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import tarfile
import zlib

from ..errors import KdcacheError

_META_B = re.compile(rb"__[^/]*__($|/)")  # WebDataset's per-shard metadata members

_BLOCK = tarfile.BLOCKSIZE
_EXT_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
              tarfile.SOLARIS_XHDTYPE)
_EXT_KEEP = 1 << 20  # extension headers (long names, PAX records) longer than this are skipped, not parsed
_PAX_RECORD = re.compile(rb"(\d+) ")
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode .. devminor


class TarCheck:
    """The block structure of one tar archive, followed as its bytes are fed in order.

    ``feed(bytes)`` for bytes whose content matters or may; ``skip(n)`` for member data that a
    seeking reader jumps over; ``eof()`` once the input has ended. ``problem`` is then None for a
    complete archive, or what is wrong and where (byte offsets in the uncompressed tar).
    """

    def __init__(self, url: str, drain=None):
        self.url = url
        self.drain = drain  # reads the rest of the input (feeding it here) once tarfile is done
        self.pos = 0  # bytes of the tar seen so far
        self.state = "header"  # header | ext | sparse | data | end
        self.need = _BLOCK  # bytes left in the current header block / extension / member data
        self.buf = bytearray()  # the header block or extension data being collected
        self.zero_blocks = 0
        self.headers_ok = 0  # valid headers seen (0: not known to be a tar at all)
        self._numbers_ok = b""  # the last header's numeric fields that were found valid
        self.ext: dict = {}  # pending long name / PAX values for the next member
        self.ext_type = None
        self.member: tuple[bytes, int] | None = None  # (name, size) of the member whose data is passing
        self.member_reg = False
        self.last_key: str | None = None
        self.last_key_b: bytes | None = None
        self.samples = 0
        self.problem: str | None = None
        self.truncated = False  # the problem is that the input ended early
        self.stream_error: str | None = None  # the compressed stream could not be decoded to its end
        self.ended = False

    # -- input --

    def feed(self, data) -> None:
        mv = memoryview(data)
        i, n = 0, len(mv)
        while i < n and self.problem is None:
            if self.state == "data":
                take = min(self.need, n - i)
                self._advance(take)
                i += take
                continue
            if self.state == "end":
                chunk = mv[i:].tobytes()
                if chunk.count(0) != len(chunk):
                    first = len(chunk) - len(chunk.lstrip(b"\0"))
                    self._fail(
                        f"has data after its end-of-archive marker (at byte {self.pos + first}, "
                        f"after {self._after()}): "
                        "tar readers stop at the marker and would silently skip it; were two tars concatenated? "
                        "Re-pack it",
                        prefix=False,
                    )
                self.pos += n - i
                return
            take = min(self.need, n - i)
            if self.state != "ext" or len(self.buf) + take <= _EXT_KEEP:  # else: too long to parse
                self.buf += mv[i : i + take]
            self.pos += take
            self.need -= take
            i += take
            if self.need == 0:
                self._unit_done()

    def skip(self, n: int) -> None:
        """``n`` bytes of member data, not looked at (a seeking reader jumped over them)."""
        assert self.state == "data" and n <= self.need
        self._advance(n)

    def eof(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.problem is not None:
            return
        at = self.pos
        if self.state == "end":
            return
        if self.state == "data" and self.member is not None:
            name, size = self.member
            padded = -(-size // _BLOCK) * _BLOCK
            present = max(0, min(size, padded - self.need))
            name = name.decode("utf-8", "surrogateescape")
            where = f"inside the data of member {name!r} at byte {at} ({present} of its {size} bytes are there)"
        elif self.state in ("ext", "sparse") or (self.state == "header" and any(self.buf)):
            where = f"inside a tar header at byte {at}"
        elif self.zero_blocks or self.buf:
            where = f"inside the end-of-archive marker at byte {at} (a tar ends with two zero blocks)"
        else:
            where = (f"at byte {at}, at a member boundary, without the end-of-archive marker "
                     "(a tar ends with two zero blocks)")
        self.truncated = True
        self._fail(f"the file ends {where}")

    # -- results --

    def raise_if_broken(self) -> None:
        """Raise the KdcacheError for a problem seen so far (only once the bytes were seen to be a
        tar at all: for anything else tarfile's own error says more)."""
        if self.problem is None or self.headers_ok == 0:
            return
        raise KdcacheError(self.problem)

    def finish(self) -> None:
        """tarfile says the archive is over: read the rest of the input, then raise if the archive
        did not end properly."""
        if self.drain is not None:
            self.drain()
        self.eof()
        self.raise_if_broken()

    # -- internals --

    def _after(self) -> str:
        if self.last_key is None:
            return "no complete sample"
        return f"key {self.last_key!r}, {self.samples} samples"

    def _fail(self, what: str, prefix: bool = True) -> None:
        if self.problem is not None:
            return
        if not prefix:
            self.problem = f"shard {self.url} {what}"
            return
        kind = "truncated" if self.truncated else "damaged"
        if self.last_key is None:
            head = f"shard {self.url} is {kind} before its first complete sample (0 samples read)"
        else:
            head = f"shard {self.url} is {kind} after key {self.last_key!r} ({self.samples} samples read)"
        if self.stream_error:
            what = (f"the compressed stream ends early or is damaged ({self.stream_error}), and so {what} "
                    "of the tar inside it")
        self.problem = f"{head}: {what}; re-copy or re-pack it"

    def _advance(self, take: int) -> None:
        self.pos += take
        self.need -= take
        if self.need == 0:
            self._member_done()
            self.state, self.need = "header", _BLOCK

    def _member_done(self) -> None:
        if self.member is None or not self.member_reg:
            return
        name = self.member[0]  # bytes
        if name.startswith(b"__") and (name.endswith(b"__") and b"/" not in name or _META_B.match(name)):
            return  # webdataset's per-shard metadata members are not samples
        slash = name.rfind(b"/")
        dot = name.find(b".", slash + 1)
        if dot <= slash + 1:
            return  # no extension, or a dot first: webdataset ignores it (no key)
        key = name[:dot]
        if key != self.last_key_b:
            self.samples += 1
            self.last_key_b = key
            self.last_key = key.decode("utf-8", "surrogateescape")

    def _unit_done(self) -> None:
        buf, self.buf = bytes(self.buf), bytearray()
        if self.state == "header":
            self._header(buf)
        elif self.state == "ext":
            self._extension(buf)
            self.state, self.need = "header", _BLOCK
        elif self.state == "sparse":
            if buf[504]:  # another extension block follows
                self.need = _BLOCK
            else:
                self._data_follows()

    def _header(self, block: bytes) -> None:
        start = self.pos - _BLOCK
        if block.count(0) == _BLOCK:
            if self.ext_type is not None:
                self._fail(f"its tar header at byte {start} is a zero block where the header a "
                           f"{self.ext_type} extension announced should be")
                return
            self.zero_blocks += 1
            if self.zero_blocks == 2:
                self.state = "end"
            self.need = _BLOCK
            return
        if self.zero_blocks:
            self._fail(f"a lone zero block at byte {start - _BLOCK} ends the archive early for tar readers, "
                       "but more data follows it")
            return
        # The fields tarfile.TarInfo.frombuf would check, parsed here without building a TarInfo
        # (this runs for every header of every shard read).
        try:
            chksum = tarfile.nti(block[148:156])
            size = tarfile.nti(block[124:136])
            numbers = block[100:124] + block[136:148] + block[329:345]
            if numbers != self._numbers_ok:  # one writer usually repeats them: check each value once
                for a, b in _NUMBER_FIELDS:  # tarfile rejects the header when one is not a number
                    tarfile.nti(block[a:b])
                self._numbers_ok = numbers
        except (tarfile.HeaderError, ValueError):
            self._fail(f"it has a damaged tar header at byte {start} (invalid number field)")
            return
        unsigned = 256 + sum(block) - sum(block[148:156])
        if chksum != unsigned and chksum not in tarfile.calc_chksums(block):
            self._fail(f"it has a damaged tar header at byte {start} (bad checksum)")
            return
        self.headers_ok += 1
        kind = block[156:157]
        if kind in _EXT_TYPES:
            self.ext_type = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK: "GNU long-link"}.get(
                kind, "PAX")
            self._ext_kind, self._ext_size = kind, size
            self.state = "ext"
            self.need = -(-size // _BLOCK) * _BLOCK
            if self.need == 0:
                self._extension(b"")
                self.state, self.need = "header", _BLOCK
            return
        name = self.ext.pop("name", None)
        if name is None:  # as tarfile reads it: name field, ustar prefix field before it
            name = block[:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix and kind not in tarfile.GNU_TYPES:
                name = prefix + b"/" + name
        pax_size = self.ext.pop("size", None)
        self.ext, self.ext_type = {}, None
        if pax_size is not None:
            size = pax_size
        if kind == tarfile.AREGTYPE and name.endswith(b"/"):
            kind = tarfile.DIRTYPE
        is_reg = kind in tarfile.REGULAR_TYPES
        has_data = is_reg or kind not in tarfile.SUPPORTED_TYPES
        self.member = (name, size if has_data else 0)
        self.member_reg = is_reg
        if kind == tarfile.GNUTYPE_SPARSE and block[482]:
            self.state, self.need = "sparse", _BLOCK  # extension blocks of sparse maps come first
            return
        self._data_follows()

    def _data_follows(self) -> None:
        size = self.member[1] if self.member else 0
        self.state = "data"
        self.need = -(-size // _BLOCK) * _BLOCK
        if self.need == 0:
            self._member_done()
            self.state, self.need = "header", _BLOCK

    def _extension(self, data: bytes) -> None:
        kind, size = self._ext_kind, self._ext_size
        data = data[:size]
        if kind == tarfile.GNUTYPE_LONGNAME:
            self.ext["name"] = data.split(b"\0", 1)[0]
        elif kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE) and len(data) == size:
            pos = 0
            while pos < len(data):
                m = _PAX_RECORD.match(data, pos)
                length = int(m.group(1)) if m else 0
                if not m or length < len(m.group(0)) + 2 or pos + length > len(data):
                    # tarfile gives up on such a header, and with it on the rest of the archive
                    self._fail(f"it has a damaged PAX header at byte {self.pos - len(data)}")
                    return
                keyword, _, value = data[pos + len(m.group(0)) : pos + length - 1].partition(b"=")
                if keyword == b"path":
                    self.ext["name"] = value
                elif keyword == b"size":
                    try:
                        self.ext["size"] = int(value)
                    except ValueError:
                        self._fail(f"it has a damaged PAX header at byte {self.pos - len(data)} (size {value!r})")
                        return
                pos += length


def compression(path: str) -> str | None:
    """gzip, bz2 or xz when a local file starts with that format's magic bytes, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    return _magic(head)


def _magic(head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


class _Prefixed(io.RawIOBase):
    """A read-only stream: some bytes already read, then the rest of another stream."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def readable(self):
        return True

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class CheckedStream:
    """A shard's byte stream, decompressed when it is gzip/bz2/xz, that feeds a ``TarCheck``
    with every byte read from it. Reading past the end of the tar (``finish``) checks that it
    ended properly. Decompression errors end the stream and are reported by the check."""

    def __init__(self, url: str, raw):
        self.raw = raw
        self.check = TarCheck(url, drain=self._drain)
        head = self._read_raw(raw, 6)
        kind = _magic(head)
        src = _Prefixed(head, raw)
        self.src = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bz2": bz2.BZ2File,
                    "xz": lzma.LZMAFile}[kind](io.BufferedReader(src)) if kind else src
        self.compressed = kind is not None
        self.done = False

    @staticmethod
    def _read_raw(raw, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = raw.read(n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        if n is None or n < 0:
            n = 1 << 62
        parts, got = [], 0
        while got < n:  # a pipe or a socket may return less than asked before its end
            try:
                chunk = self.src.read(min(n - got, 1 << 20))
            except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
                if not self.compressed:
                    raise
                self.check.stream_error = f"{type(e).__name__}: {e}"
                chunk = b""
            if not chunk:
                self.done = True
                break
            parts.append(chunk)
            got += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if data:
            self.check.feed(data)
        if self.done:
            self.check.eof()
        return data

    def readable(self):
        return True

    def _drain(self) -> None:
        """Read what tarfile left (only zero padding may follow the end-of-archive marker)."""
        while not self.done and self.check.problem is None:
            self.read(1 << 16)

    def close(self) -> None:
        for f in (self.src, self.raw):
            try:
                f.close()
            except Exception:  # a pipe whose reader stopped early, a stream already closed
                pass


def check_local_tar(path: str) -> None:
    """Walk a local uncompressed tar's headers, seeking over member data, and raise the
    KdcacheError of a truncated or damaged archive."""
    check = TarCheck(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = 0
            while check.problem is None and pos < size:
                if check.state == "data":
                    n = min(check.need, size - pos)
                    check.skip(n)
                    pos += n
                    f.seek(pos)
                    continue
                want = check.need if check.state != "end" else 1 << 16
                data = f.read(min(max(want, 1), 1 << 20))
                if not data:
                    break
                check.feed(data)
                pos += len(data)
    except OSError as e:
        raise KdcacheError(f"cannot read shard {path}: {e}") from None
    check.eof()
    check.raise_if_broken()
