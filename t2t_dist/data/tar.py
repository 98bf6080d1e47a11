"""Our tar reader, for where byte offsets matter: samples of a Range read's bytes, a shard's index.

A WebDataset sample is a run of consecutive members sharing a key: ``n0144_10026.cls``,
``n0144_10026.jpg``, ``n0144_10026.json``. The manifest records each sample's byte offset,
so the loader reads a run of samples with one Range read and ``parse_tar_samples`` parses
the bytes: plain ustar headers (what ``write_shards`` writes) by hand, several times cheaper
than ``tarfile`` or webdataset on the same bytes (``benchmarks/tar_parse.py``), anything
else (PAX or GNU headers, odd member types) through ``tarfile``. ``TarIndex`` finds the
offsets of shards written by other tools while ``shards check`` streams them. Writing
(webdataset's ``TarWriter``) and reading whole shards (webdataset's tar iterators) are not here.

A ustar header is one 512-byte block: name [0:100], size [124:136] (octal), checksum
[148:156], type [156], magic [257:262] ``ustar``, name prefix [345:500]; the member's data
follows, padded to a multiple of 512 bytes.
"""

from __future__ import annotations

import io
import json
import tarfile

BLOCK = 512
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
_REGULAR = (b"0", b"\0")
_NEXT_MEMBER_HEADERS = (b"x", b"L", b"K")  # PAX extended, GNU long name/link: for the next member


def split_member(name: str) -> tuple[str, str]:
    """``dir/n0144_10026.jpg`` -> (``dir/n0144_10026``, ``jpg``): the key ends at the first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _read_header(block: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, data size, type flag) of a header block; ``tarfile.ReadError`` if it is not one."""
    try:
        checksum = int(block[148:156].strip(b"\0 ") or b"-1", 8)
        size = int(block[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"no tar header at byte {offset}") from None
    if sum(block[:148]) + sum(block[156:]) + 8 * 32 != checksum:
        raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")
    name = block[:100].split(b"\0", 1)[0].decode()
    prefix = block[345:500].split(b"\0", 1)[0].decode() if block[257:262] == b"ustar" else ""
    return (f"{prefix}/{name}" if prefix else name), size, block[156:157]


def _samples_with_tarfile(data: bytes) -> list[dict[str, bytes]]:
    samples: list[dict[str, bytes]] = []
    current = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, extension = split_member(info.name)
            if key != current:
                current = key
                samples.append({})
            samples[-1][extension] = tar.extractfile(info).read()
    return samples


def parse_tar_samples(data: bytes) -> list[dict[str, bytes]]:
    """Samples of whole tar members held in memory, in order: ``{extension: bytes}`` each.

    Plain ustar members are parsed here; the first header that is anything else (PAX or GNU
    long names, directories, links) hands the whole buffer to ``tarfile``. Raises
    ``tarfile.ReadError`` on a header that does not check out or data that stops short.
    """
    view = memoryview(data)
    samples: list[dict[str, bytes]] = []
    current, offset = None, 0
    while offset + BLOCK <= len(data):
        block = data[offset:offset + BLOCK]
        if block.count(0) == BLOCK:
            break  # end-of-archive blocks
        if block[156:157] not in _REGULAR or block[257:262] != b"ustar":
            return _samples_with_tarfile(data)
        name, size, _ = _read_header(block, offset)
        key, extension = split_member(name)
        if key != current:
            current = key
            samples.append({})
        end = offset + BLOCK + size
        if end > len(data):
            raise tarfile.ReadError(f"member {name} ends past the data ({end} > {len(data)})")
        samples[-1][extension] = bytes(view[offset + BLOCK:end])
        offset += BLOCK + _padded(size)
    return samples


def _pax_path(payload: bytes) -> str | None:
    """The ``path`` record of a PAX extended header (records are ``<length> <key>=<value>\\n``)."""
    for record in payload.decode("utf-8", "replace").split("\n"):
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


class TarIndex:
    """Each sample's byte offset, from the headers of a tar read in order: ``feed`` it the bytes
    as they stream by (any chunk sizes; member data is passed over, not kept), then ``offsets()``.

    A sample's offset is its first header; a PAX or GNU header that describes the sample's
    first member counts, as in ``tarfile``'s ``TarInfo.offset``. Unlike ``tarfile``, which
    ends an archive quietly at a bad or cut header after the first member, a bad header or
    data that stops inside a header or member is an error.
    """

    def __init__(self) -> None:
        self.position = 0  # bytes fed so far
        self.ended = False  # the end-of-archive block was seen
        self.error: tarfile.ReadError | None = None
        self._next = 0  # where the next header (or extended header's data) starts
        self._want = BLOCK  # bytes to collect there
        self._buffer = bytearray()
        self._extended = b""  # type of the extended header whose data is being collected
        self._start: int | None = None  # first header of the next member
        self._long_name: str | None = None
        self._key: str | None = None
        self._offsets: list[int] = []
        self._end = 0

    def feed(self, data: bytes) -> None:
        view, at = memoryview(data), 0
        while at < len(view) and not (self.ended or self.error):
            if self.position < self._next:  # member data: pass over it
                step = min(self._next - self.position, len(view) - at)
            else:
                step = min(self._want - len(self._buffer), len(view) - at)
                self._buffer += view[at:at + step]
            at, self.position = at + step, self.position + step
            if self.position >= self._next and len(self._buffer) == self._want:
                block = bytes(self._buffer)
                self._buffer.clear()
                try:
                    self._parse(block)
                except (tarfile.ReadError, UnicodeDecodeError) as error:
                    self.error = tarfile.ReadError(str(error))

    def _parse(self, block: bytes) -> None:
        if self._extended:  # the data of a PAX or GNU long-name header: names the next member
            payload = block[:self._extended_size]
            if self._extended == b"x":
                self._long_name = _pax_path(payload) or self._long_name
            elif self._extended == b"L":
                self._long_name = payload.rstrip(b"\0").decode()
            self._extended, self._want, self._next = b"", BLOCK, self.position
            return
        if block.count(0) == BLOCK:
            self.ended = True
            return
        at = self.position - BLOCK
        name, size, kind = _read_header(block, at)
        self._start = at if self._start is None else self._start
        self._next = self.position
        if kind in _NEXT_MEMBER_HEADERS:
            if size:
                self._extended, self._extended_size, self._want = kind, size, _padded(size)
            return
        self._next += _padded(size)
        if kind in _REGULAR:
            key, _ = split_member(self._long_name or name)
            if key != self._key:
                self._key = key
                self._offsets.append(self._start)
            self._end = self._next
        self._start, self._long_name = None, None

    def offsets(self) -> list[int]:
        """Each sample's first header offset, then the end of the last sample's data (the
        ``offsets`` of a manifest entry); ``tarfile.ReadError`` if the tar was bad or cut."""
        if self.error is not None:
            raise self.error
        if not self.ended and (self._buffer or self.position < self._next):
            where = "member" if self.position < self._next or self._extended else "header"
            raise tarfile.ReadError(f"tar data stops at byte {self.position}, inside a {where}")
        return self._offsets + [self._end]


def sample_label(fields: dict[str, bytes]) -> int | None:
    """The class index from ``cls`` (or ``json["label"]``); None when there is none."""
    try:
        if "cls" in fields:
            return int(fields["cls"].decode().strip())
        if "json" in fields:
            label = json.loads(fields["json"]).get("label")
            return int(label) if label is not None else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return None


def sample_image(fields: dict[str, bytes]) -> bytes | None:
    """The image bytes of a sample (``jpg``, ``jpeg``, ``png`` or ``webp``); None when there is none."""
    return next((fields[name] for name in IMAGE_FIELDS if name in fields), None)
