"""Input discovery and streaming: turn --input paths into an ordered list of sources and cut
each source into work units.

A unit is about `unit_bytes` of input that ends on a document boundary. Where units end depends
only on the bytes of the file, never on the number of workers or ranks, so (source, unit index)
names the same documents on every run: that is what makes the output independent of the
parallelism and lets a rerun skip units that are already done.

The reading side stays cheap (block reads, one regex search per unit) so one process can feed
many tokenizing workers; decoding, parsing and tokenizing happen in the workers (encode.py).

Inputs are local paths, fsspec URLs (hf://, s3://, gs://, file://, memory://, ...: the same files,
read through fsspec) or `dataset:NAME[:SPLIT]` / `dataset:NAME:CONFIG:SPLIT`: a `datasets` dataset
(hub name or local directory) streamed in its own order, never downloaded whole.
"""

import bz2
import glob
import gzip
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePath, PurePosixPath

import zstandard

COMPRESSED = (".gz", ".bz2", ".zst", ".zstd")
JSONL = (".jsonl", ".ndjson", ".json")
DATA_SUFFIXES = (".txt", ".text", ".parquet") + JSONL
# A blank line (only whitespace) ends a document; a newline ends a JSONL record.
DOC_BOUNDARY = re.compile(rb"\n[ \t\r\f\v]*\n")
RECORD_BOUNDARY = re.compile(rb"\n")
# Plain text with no document boundary for this many unit sizes is cut anyway (at a line end if
# there is one, else inside the line): an enormous line is never held whole.
HARD_CAP_UNITS = 8
RECORD_BATCH = 1024
DATASET_PREFIX = "dataset:"


class InputError(Exception):
    """Bad input: the message names the file and says what to do."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute path, fsspec URL, or dataset:NAME...
    kind: str  # "text", "jsonl", "parquet", "dataset" (a `datasets` save_to_disk directory) or "stream"
    size: int  # bytes on disk (for a dataset: of its Arrow files; for a stream: 0, unknown)
    mtime_ns: int


@dataclass
class Unit:
    source: int  # index into the source list
    index: int  # unit number within the source
    kind: str  # "text" and "jsonl": payload is bytes; "records": payload is list[str]
    payload: object
    path: str
    first_line: int  # line number of the payload's first line (text, jsonl), for messages
    nbytes: int  # input bytes consumed (on disk, i.e. compressed), for the progress bar
    split_lines: int = 0  # 1 when the unit was cut inside a line (hard cap)
    split_documents: int = 0  # 1 when the unit was cut inside a document (hard cap)

    @property
    def key(self) -> str:
        return unit_key(self.source, self.index)


def unit_key(source: int, index: int) -> str:
    return f"{source:06d}-{index:08d}"


def is_url(arg: str) -> bool:
    return "://" in arg


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _kind(path: PurePath) -> str:
    name = path.name.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(JSONL) else "text"


def _wanted_in_dir(path: PurePath) -> bool:
    name = path.name.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    return not path.name.startswith(".") and name.endswith(DATA_SUFFIXES)


def _expand(arg: str) -> list[Path]:
    if glob.has_magic(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            raise InputError(f"{arg}: no file matches this pattern")
        return [Path(m) for m in matches]
    path = Path(arg)
    if not path.exists():
        what = "broken symbolic link" if path.is_symlink() else "no such file or directory"
        raise InputError(f"{arg}: {what}; check the --input path")
    return [path]


def discover(inputs: list[str]) -> list[Source]:
    """Ordered, de-duplicated sources: arguments in the order given, directories and globs
    sorted. Every file is opened once here so a missing or unreadable file stops the run before
    anything is written."""
    sources, seen = [], set()
    for arg in inputs:
        for source in _sources(arg):
            if source.path not in seen:
                seen.add(source.path)
                sources.append(source)
    if not sources:
        raise InputError(f"no input files in {' '.join(inputs)}")
    return sources


def _sources(arg: str) -> list[Source]:
    if arg.startswith(DATASET_PREFIX):
        _load_stream(arg)  # a name or split that does not exist stops the run here
        return [Source(arg, "stream", 0, 0)]
    if is_url(arg):
        return _remote_sources(arg)
    paths = []
    for path in _expand(arg):
        if path.is_dir() and not _is_dataset_dir(path):
            found = sorted(p for p in path.rglob("*") if p.is_file() and _wanted_in_dir(p))
            if not found:
                raise InputError(
                    f"{path}: directory holds no .txt/.jsonl/.json/.parquet files "
                    f"(optionally .gz/.bz2/.zst) and is not a saved `datasets` dataset"
                )
            paths += found
        else:
            paths.append(path)
    return [_local_source(path.resolve()) for path in paths]


def _local_source(path: Path) -> Source:
    if path.is_dir():
        files = list(path.rglob("*.arrow"))
        return Source(
            str(path),
            "dataset",
            sum(f.stat().st_size for f in files),
            max((f.stat().st_mtime_ns for f in files), default=0),
        )
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the file's permissions") from e
    st = path.stat()
    return Source(str(path), _kind(path), st.st_size, st.st_mtime_ns)


def _remote_sources(url: str) -> list[Source]:
    """The files of an fsspec URL: one file, a directory (its data files, recursively) or a glob."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        if glob.has_magic(root):
            paths = sorted(fs.glob(root))
        elif fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if _wanted_in_dir(PurePosixPath(p)))
        else:
            paths = [root] if fs.isfile(root) else []
        infos = [fs.info(p) for p in paths]
    except ImportError as e:
        raise InputError(f"{url}: {e} (s3:// needs pip install 'earlybert[s3]', gs:// 'earlybert[gcs]')") from e
    except (OSError, ValueError) as e:
        raise InputError(f"{url}: cannot list ({type(e).__name__}: {e}); check the URL and its credentials") from e
    if not paths:
        raise InputError(f"{url}: no such file, no data files under it, or no match for the pattern; check the URL")
    return [
        Source(fs.unstrip_protocol(p), _kind(PurePosixPath(p)), info["size"], _mtime_ns(info))
        for p, info in zip(paths, infos, strict=True)
    ]


def _mtime_ns(info: dict) -> int:
    """The modification time in an fsspec info record (each filesystem names it its way), or 0."""
    keys = ("mtime", "LastModified", "updated", "last_modified", "created")
    value = next((info[k] for k in keys if info.get(k) is not None), 0)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        value = value.timestamp()
    return int(value * 1e9)


def _open(path: str):
    """A binary file: local, or through fsspec for a URL."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _load_stream(arg: str):
    """The IterableDataset of `dataset:NAME[:SPLIT]` or `dataset:NAME:CONFIG:SPLIT` (default split: train)."""
    import datasets

    parts = arg.removeprefix(DATASET_PREFIX).split(":")
    if len(parts) > 3 or not parts[0]:
        raise InputError(f"{arg}: expected dataset:NAME, dataset:NAME:SPLIT or dataset:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types: missing name, config or split, no network
        raise InputError(
            f"{arg}: cannot load the dataset ({type(e).__name__}: {e}); check its name, config and split"
        ) from e


class _Counted:
    """File wrapper that tracks how many on-disk bytes were read (progress of compressed input)."""

    def __init__(self, f):
        self.f, self.pos = f, 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.pos += len(b)
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)


def open_stream(raw):
    """(decompressed byte stream, counter of on-disk bytes) over an open binary file.
    Compression is sniffed from the magic bytes, not the file name."""
    magic = raw.read(4)
    raw.seek(0)
    counted = _Counted(raw)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=counted), counted
    if magic[:3] == b"BZh":
        return bz2.BZ2File(counted), counted
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(counted, read_across_frames=True), counted
    return counted, counted


def _byte_units(source_id, source: Source, unit_bytes: int, boundary: re.Pattern, hard_cap: int | None):
    kind = "text" if source.kind == "text" else "jsonl"
    buf, eof, index, line, reported = bytearray(), False, 0, 1, 0
    with _open(source.path) as raw:
        stream, counted = open_stream(raw)
        while buf or not eof:
            while not eof and len(buf) < unit_bytes:
                block = stream.read(unit_bytes)
                eof = not block
                buf += block
            if not buf:
                break
            # First boundary at or after unit_bytes, looked for only below the cap so that where
            # a unit ends never depends on how many bytes a read happened to return.
            match = boundary.search(buf, unit_bytes - 1, hard_cap or len(buf))
            split_lines = split_docs = 0
            if match:
                cut = match.end()
            elif eof:
                cut = len(buf)
            elif hard_cap is None or len(buf) < hard_cap:
                block = stream.read(unit_bytes)
                eof = not block
                buf += block
                continue
            else:
                cut = buf.rfind(b"\n", 0, hard_cap) + 1
                if cut > 0:
                    split_docs = 1
                else:
                    cut = hard_cap
                    while 0 < cut < len(buf) and buf[cut] & 0xC0 == 0x80:  # never cut inside a UTF-8 character
                        cut -= 1
                    split_lines = 1
            payload = bytes(buf[:cut])
            del buf[:cut]
            yield Unit(
                source_id, index, kind, payload, source.path, line, counted.pos - reported, split_lines, split_docs
            )
            reported = counted.pos
            line += payload.count(b"\n")
            index += 1


def _parquet_batches(source: Source, text_field: str):
    import pyarrow.parquet as pq

    with _open(source.path) as raw:
        f = pq.ParquetFile(raw)
        if text_field not in f.schema_arrow.names:
            raise InputError(
                f"{source.path}: no column {text_field!r} (columns: "
                f"{', '.join(f.schema_arrow.names)}); pass --text-field"
            )
        for batch in f.iter_batches(batch_size=RECORD_BATCH, columns=[text_field]):
            yield batch.column(0).to_pylist()


def _dataset_batches(source: Source, text_field: str):
    import datasets

    loaded = datasets.load_from_disk(source.path)
    # A DatasetDict contributes every split, in name order.
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if text_field not in part.column_names:
            raise InputError(
                f"{source.path}: no column {text_field!r} (columns: {', '.join(part.column_names)}); pass --text-field"
            )
        for batch in part.select_columns([text_field]).iter(batch_size=RECORD_BATCH):
            yield batch[text_field]


def _stream_batches(source: Source, text_field: str):
    for batch in _load_stream(source.path).iter(batch_size=RECORD_BATCH):
        if text_field not in batch:
            raise InputError(
                f"{source.path}: no column {text_field!r} (columns: {', '.join(batch)}); pass --text-field"
            )
        yield batch[text_field]


RECORD_READERS = {"parquet": _parquet_batches, "dataset": _dataset_batches, "stream": _stream_batches}


def _record_units(source_id, source: Source, unit_bytes: int, text_field: str):
    records, size, index = [], 0, 0
    for batch in RECORD_READERS[source.kind](source, text_field):
        for text in batch:
            if text is not None and not isinstance(text, str):
                raise InputError(f"{source.path}: column {text_field!r} holds {type(text).__name__}, not text")
            records.append(text or "")
            size += len(records[-1])
            if size >= unit_bytes:
                yield Unit(source_id, index, "records", records, source.path, 0, 0)
                records, size, index = [], 0, index + 1
    if records:
        yield Unit(source_id, index, "records", records, source.path, 0, 0)


def read_units(source_id: int, source: Source, unit_bytes: int, text_field: str = "text"):
    """Yield the units of one source in order. Read errors (corrupt compressed data, I/O errors)
    become an InputError naming the file."""
    try:
        if source.kind in RECORD_READERS:
            # Record formats carry no byte position: report their size once, with the last unit.
            last = None
            for unit in _record_units(source_id, source, unit_bytes, text_field):
                if last is not None:
                    yield last
                last = unit
            if last is not None:
                last.nbytes = source.size
                yield last
        else:
            cap = HARD_CAP_UNITS * unit_bytes if source.kind == "text" else None
            boundary = DOC_BOUNDARY if source.kind == "text" else RECORD_BOUNDARY
            yield from _byte_units(source_id, source, unit_bytes, boundary, cap)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zstandard.ZstdError) as e:
        raise InputError(
            f"{source.path}: cannot read ({type(e).__name__}: {e}); the file is corrupt or truncated: fix or remove it"
        ) from e
