"""The naming rules of a WebDataset shard, and one tar reader for both the index and the loader.

A sample is the run of consecutive tar members sharing a key: the member name up to the first dot of its
basename, directory prefix included (``train0003/000017.JPEG`` -> key ``train0003/000017``, suffix ``jpeg``;
suffixes are lower-cased). These are webdataset 1.0.2's rules (``tariterators.base_plus_ext``, ``lcase=True``,
``__meta__`` members skipped); tests/unit/test_foreign_data.py checks that both agree.

Why an own reader rather than tarfile + webdataset's ``tarfile_samples``: the index must walk headers without
reading image bytes (positioned reads of the 512-byte headers and the .cls data only: ~3x less time than
tarfile's member iteration, and a fraction of the bytes; docs/performance.md), a retried stream must know where
each sample starts (to resume after the last delivered one), and a failing stream must still deliver the last
complete sample (webdataset's ``group_by_keys`` only yields a sample once the next member has been read, and
tarfile ends silently at a bad header). Light on purpose: standard library only.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")  # suffixes read as the image, in this order
LABEL_SUFFIX = "cls"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old regular file, contiguous file
_GZIP_MAGIC = b"\x1f\x8b"


class TarFormatError(ValueError):
    """The bytes are not (or no longer) a tar archive: a bad header, or the data ends inside a member."""


def split_key(name: str) -> Optional[tuple[str, str]]:
    """(key, lower-case suffix) of a member name, or None for a member that belongs to no sample."""
    if name.startswith("__") and name.endswith("__") and "/" not in name or _META.match(name):
        return None
    match = _KEY.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def image_suffix(suffixes) -> Optional[str]:
    return next((s for s in IMAGE_EXTENSIONS if s in suffixes), None)


# ----------------------------------------------------------------------------------------------------
# Headers


@dataclass
class Member:
    """One regular file of the archive: its name, size, and where its first header starts."""

    name: str
    size: int
    start: int  # byte offset of its first header (extended headers included): a stream may resume here
    data: Optional[bytes] = None  # read only when asked for


def _number(field_: bytes) -> int:
    if field_[:1] in (b"\x80", b"\xff"):  # GNU base-256 (files over 8 GiB)
        value = int.from_bytes(field_[1:], "big")
        return value - (1 << (8 * (len(field_) - 1))) if field_[:1] == b"\xff" else value
    text = field_.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _pax(data: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space] or b"0")
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _header(block: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a 512-byte header; TarFormatError when its checksum is wrong."""
    try:
        stored = _number(block[148:156])
    except ValueError:
        stored = -1
    unsigned = 256 + sum(block) - sum(block[148:156])  # the checksum field counts as 8 spaces
    if stored != unsigned and stored != unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127):
        raise TarFormatError(f"not a tar header at byte {offset} (bad checksum)")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345:346] != b"\0":  # POSIX ustar: a name prefix
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    try:
        size = _number(block[124:136])
    except ValueError:
        raise TarFormatError(f"bad size field in the tar header at byte {offset}") from None
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


class _Blocks:
    """Reads a tar from a local file (``size`` given: positioned reads, ``os.pread``, so skipped data is never read,
    one system call per header) or from a stream (skipped data is read away)."""

    def __init__(self, fileobj: BinaryIO, size: Optional[int] = None, base: int = 0):
        self.f, self.size, self.pos = fileobj, size, base
        self.fd = _fileno(fileobj) if size is not None else None
        self._pending = b""
        head = os.pread(self.fd, 2, base) if self.fd is not None else fileobj.read(2)
        if head == _GZIP_MAGIC:  # a .tar.gz: offsets are then in the decompressed stream
            if self.fd is not None:
                fileobj.seek(base + 2)
            self.f = gzip.GzipFile(fileobj=_Prefixed(head, fileobj))
            self.fd, self.size = None, None
        elif self.fd is None:
            self._pending = head

    def read(self, n: int) -> bytes:
        if self.fd is not None:
            out = os.pread(self.fd, n, self.pos)
            self.pos += len(out)
            return out
        out = self._pending[:n]
        self._pending = self._pending[n:]
        while len(out) < n:
            chunk = self.f.read(n - len(out))
            if not chunk:
                break
            out += chunk
        self.pos += len(out)
        return out

    def skip(self, n: int) -> bool:
        """Move n bytes on; False when the archive ends first."""
        if self.fd is not None:
            self.pos += n
            return self.pos <= self.size
        while n > 0:
            got = len(self.read(min(n, 1 << 20)))
            if not got:
                return False
            n -= got
        return True


def _fileno(fileobj) -> Optional[int]:
    try:
        return fileobj.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


class _Prefixed(io.RawIOBase):
    """A stream with a few bytes already read put back in front (to sniff gzip)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def walk_members(
    fileobj: BinaryIO,
    want: Callable[[str], bool],
    *,
    size: Optional[int] = None,
    base: int = 0,
    on_header: Optional[Callable[[str, int], None]] = None,
) -> Iterator[Member]:
    """The regular files of a tar in order, with the data of those ``want(name)`` accepts.

    ``size``: the file's length when it is a local file (data is then skipped with seeks); ``base``: the byte
    offset the stream starts at (a resumed download); ``on_header(name, start)``: called for each regular file
    before its data is read (so a reader knows the previous sample is complete even if this data is cut).
    Ends at the end-of-archive block or at the end of the bytes after a complete member; raises TarFormatError
    for a bad header or data cut short."""
    blocks = _Blocks(fileobj, size, base)
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    start = None
    while True:
        offset = blocks.pos
        block = blocks.read(BLOCK)
        if not block or block == bytes(BLOCK):
            return
        if len(block) < BLOCK:
            raise TarFormatError(f"the archive ends inside a header at byte {offset}")
        start = offset if start is None else start
        name, length, kind = _header(block, offset)
        padded = -(-length // BLOCK) * BLOCK
        if kind in (b"L", b"x", b"g", b"K"):  # GNU long name / pax headers: they describe the next member
            data = blocks.read(padded)[:length]
            if len(data) < length:
                raise TarFormatError(f"the archive ends inside an extended header at byte {offset}")
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax(data)
            continue
        name = pax.get("path") or long_name or name
        length = int(pax["size"]) if "size" in pax else length
        padded = -(-length // BLOCK) * BLOCK
        member = Member(name, length, start)
        long_name, pax, start = None, {}, None
        if kind in _REGULAR and on_header is not None:
            on_header(name, member.start)
        if kind in _REGULAR and want(name):
            member.data = blocks.read(length)
            complete = len(member.data) == length and blocks.skip(padded - length)
        else:
            complete = blocks.skip(padded)
        if not complete:
            raise TarFormatError(f"the archive ends inside {name} (truncated)")
        if kind in _REGULAR:
            yield member


# ----------------------------------------------------------------------------------------------------
# Samples


class _Grouper:
    """Members -> samples by key; a sample is complete once the next key's header has been seen."""

    def __init__(self, url: str = ""):
        self.url, self.current, self.ready = url, None, []
        self._name, self._parts = None, None

    def on_header(self, name: str, start: int) -> None:
        self._name, self._parts = name, split_key(name)
        parts = self._parts
        if parts is not None and self.current is not None and parts[0] != self.current["__key__"]:
            self.ready.append((self.current, start))
            self.current = None

    def add(self, name: str, data: Optional[bytes]) -> None:
        parts = self._parts if name == self._name else split_key(name)
        if parts is None:
            return
        if self.current is None:
            self.current = {"__key__": parts[0], "__url__": self.url}
        if parts[1] in self.current:
            self.current["__duplicate__"] = parts[1]
        self.current[parts[1]] = data

    def take(self) -> list[tuple[dict, int]]:
        out, self.ready = self.ready, []
        return out


def iter_samples(
    fileobj: BinaryIO, url: str, *, size: Optional[int] = None, base: int = 0
) -> Iterator[tuple[dict, int]]:
    """(sample, offset where the next sample starts) for each sample: ``{"__key__", "__url__", suffix: bytes}``.

    A sample is complete as soon as the next key's header is read (before that member's data), so a stream that
    fails later still delivers every complete sample. A suffix given twice marks the sample ``__duplicate__``."""
    group = _Grouper(url)
    try:
        for member in walk_members(fileobj, lambda _n: True, size=size, base=base, on_header=group.on_header):
            yield from group.take()
            group.add(member.name, member.data)
    except Exception:
        yield from group.take()
        raise
    yield from group.take()
    if group.current is not None:
        yield group.current, -1


@dataclass
class ShardScan:
    """What a walk over a shard's headers found; ``.cls`` members are the only data read."""

    members: int = 0  # regular files, as ``tar tf`` lists them (directories aside)
    samples: int = 0  # keys with an image member (what the loader serves, undecodable images aside)
    no_image: int = 0  # keys without one (captions alone, metadata): the loader skips and counts them
    labeled: int = 0  # samples with a .cls
    duplicates: int = 0  # samples with a suffix given twice (skipped by the loader)
    images: dict[str, int] = field(default_factory=dict)  # image suffix -> samples
    cls_min: Optional[int] = None
    cls_max: Optional[int] = None
    cls_min_key: Optional[str] = None
    cls_max_key: Optional[str] = None
    bad_label: Optional[list[str]] = None  # [key, text] of the first .cls that is not an integer
    error: Optional[str] = None  # why the walk stopped early (truncated, not a tar)

    def add(self, key: str, suffixes: dict[str, Optional[bytes]]) -> None:
        image = image_suffix(suffixes)
        if image is None:
            self.no_image += 1
            return
        if suffixes.get("__duplicate__"):
            self.duplicates += 1
            return
        self.samples += 1
        self.images[image] = self.images.get(image, 0) + 1
        if LABEL_SUFFIX in suffixes:
            self.labeled += 1
            self._label(key, suffixes[LABEL_SUFFIX] or b"")

    def _label(self, key: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").strip()
        try:
            value = int(text)
        except ValueError:
            self.bad_label = self.bad_label or [key, text[:40]]
            return
        if self.cls_min is None or value < self.cls_min:
            self.cls_min, self.cls_min_key = value, key
        if self.cls_max is None or value > self.cls_max:
            self.cls_max, self.cls_max_key = value, key


def scan_shard(fileobj: BinaryIO, *, size: Optional[int] = None) -> ShardScan:
    """Walk one shard's headers (reading only the tiny .cls members) and count what the loader will see:
    the same grouping as iter_samples, so a shard cut short counts the samples the loader delivers from it."""
    scan = ShardScan()
    group = _Grouper()

    def want(name: str) -> bool:
        return name.lower().endswith("." + LABEL_SUFFIX)

    def count_ready() -> None:
        for sample, _ in group.take():
            scan.add(sample["__key__"], sample)

    try:
        for member in walk_members(fileobj, want, size=size, on_header=group.on_header):
            scan.members += 1
            count_ready()
            group.add(member.name, member.data)
    except TarFormatError as exc:  # the sample being read is lost, as in the loader
        scan.error = str(exc)
        count_ready()
        return scan
    count_ready()
    if group.current is not None:
        scan.add(group.current["__key__"], group.current)
    return scan
