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

Pipes are streamed: `-` (stdin), a FIFO, a process substitution such as `<(zcat corpus.jsonl.gz)`. Nothing in
the reading seeks, so a pipe is read once, front to back; text or JSONL is told by its name when it has a data
suffix, else by its first line. Other files that are not regular files (/dev/zero, a terminal, a socket) are
refused: they never end or are not a corpus.
"""

import bz2
import glob
import gzip
import json
import os
import re
import stat
import time
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
STDIN = "-"
# A pipe that has neither data nor a writer for this long is refused: a FIFO nobody writes to would wait forever.
PIPE_WAIT_S = 1.0
# zstd input read per decompression call: bounds what one call can expand to (zstd reaches ~32000:1).
ZSTD_READ = 2048


class InputError(Exception):
    """Bad input: the message names the file and says what to do."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute path, fsspec URL, dataset:NAME..., `-` (stdin) or a pipe's path as given
    # "text", "jsonl", "parquet", "dataset" (a `datasets` save_to_disk directory), "stream" (a `datasets`
    # dataset by name) or "pipe" (text or JSONL, told by its first line)
    kind: str
    size: int  # bytes on disk (for a dataset: of its Arrow files; for a stream or a pipe: 0, unknown)
    mtime_ns: int
    pipe: bool = False  # stdin, a FIFO: read once, front to back, by one process


@dataclass(frozen=True)
class Skipped:
    """A file of an input directory that is not read: the run reports it, and --strict refuses it."""

    path: str
    why: str


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


def discover(inputs: list[str], skipped: list | None = None) -> list[Source]:
    """Ordered, de-duplicated sources: arguments in the order given, directories and globs
    sorted. Every file is opened once here so a missing or unreadable file stops the run before
    anything is written. Files of input directories that cannot be read (broken links, FIFOs, devices) are
    appended to `skipped` (Skipped)."""
    sources, seen = [], set()
    for arg in inputs:
        for source in _sources(arg, [] if skipped is None else skipped):
            if source.path not in seen:
                seen.add(source.path)
                sources.append(source)
    if not sources:
        raise InputError(f"no input files in {' '.join(inputs)}")
    return sources


def local_paths(inputs: list[str], sources: list[Source]) -> list[str]:
    """The local files and directories a command reads, as given and as found: what its output must not be,
    contain or lie inside (outputs.check_output)."""
    given = [a for a in inputs if not a.startswith(DATASET_PREFIX) and not glob.has_magic(a) and a != STDIN]
    return given + [s.path for s in sources if not s.pipe and s.kind != "stream" and not is_url(s.path)]


def describe_skipped(skipped: list[Skipped], shown: int = 5) -> str:
    """'N files of the input directories skipped: PATH (why), ...'"""
    listed = ", ".join(f"{s.path} ({s.why})" for s in skipped[:shown])
    return f"{len(skipped)} files of the input directories skipped: {listed}{' ...' if len(skipped) > shown else ''}"


def _sources(arg: str, skipped: list) -> list[Source]:
    if arg.startswith(DATASET_PREFIX):
        _load_stream(arg)  # a name or split that does not exist stops the run here
        return [Source(arg, "stream", 0, 0)]
    if is_url(arg):
        return _remote_sources(arg)
    if arg == STDIN:
        return [_pipe_source(STDIN)]
    sources = []
    for path in _expand(arg):
        if path.is_dir() and not _is_dataset_dir(path):
            found = _directory_files(path, skipped)
            if not found:
                raise InputError(
                    f"{path}: directory holds no .txt/.jsonl/.json/.parquet files "
                    f"(optionally .gz/.bz2/.zst) and is not a saved `datasets` dataset"
                )
            sources += [_local_source(p.resolve()) for p in found]
        elif stat.S_ISFIFO(path.stat().st_mode):
            sources.append(_pipe_source(str(path)))  # as given: /dev/fd/63 resolves to no path at all
        else:
            sources.append(_local_source(path.resolve()))
    return sources


def _directory_files(root: Path, skipped: list) -> list[Path]:
    """The data files under `root`, sorted; those that cannot be read go to `skipped`."""
    found = []
    for p in sorted(root.rglob("*")):
        if not _wanted_in_dir(p) or p.is_dir():
            continue
        if p.is_file():
            found.append(p)
        else:
            why = "broken symbolic link" if p.is_symlink() and not p.exists() else "not a regular file"
            skipped.append(Skipped(str(p), why))
    return found


def _local_source(path: Path) -> Source:
    if path.is_dir():
        files = list(path.rglob("*.arrow"))
        return Source(
            str(path),
            "dataset",
            sum(f.stat().st_size for f in files),
            max((f.stat().st_mtime_ns for f in files), default=0),
        )
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{path}: a {_file_type(st.st_mode)}, not a file or a pipe: it never ends or holds no corpus; "
            f"pass a file, a directory, or a pipe (`-` for stdin)"
        )
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the file's permissions") from e
    return Source(str(path), _kind(path), st.st_size, st.st_mtime_ns)


def _file_type(mode: int) -> str:
    kinds = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


# ---- pipes ------------------------------------------------------------------------------
_PIPES: dict[str, "_Prefixed"] = {}  # path -> the open pipe: held from discovery on, read once


def _pipe_source(path: str) -> Source:
    """Open a pipe and wait (at most PIPE_WAIT_S) for its first byte or a writer that is still writing. It stays
    open until read: a writer whose reader went away would die of SIGPIPE."""
    name = "stdin (-)" if path == STDIN else path
    if path in _PIPES:  # discovered before in this process and not read: start again
        _PIPES.pop(path).close()
    try:
        fd = os.dup(0) if path == STDIN else os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"{name}: cannot open ({e.strerror or e})") from e
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        raise InputError(f"{name}: a {_file_type(mode)} (a terminal?), not a pipe or a file; pipe the corpus in")
    os.set_blocking(fd, False)
    deadline, writing = time.monotonic() + PIPE_WAIT_S, False
    while True:
        try:
            head = os.read(fd, 1)
        except BlockingIOError:  # a writer is there and has not written yet: it will
            head, writing = b"", True
            break
        # b"": the end of a file, or a FIFO without a writer (not there yet, or gone without writing)
        if head or not stat.S_ISFIFO(mode) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if not head and not writing and stat.S_ISFIFO(mode):
        os.close(fd)
        raise InputError(
            f"{name}: a pipe with no writer and no data after {PIPE_WAIT_S:.0f} s; start the command that "
            f"writes it first (e.g. `zcat corpus.gz > {path} &`), or use `--input <(zcat corpus.gz)`"
        )
    os.set_blocking(fd, True)
    _PIPES[path] = _Prefixed(head, os.fdopen(fd, "rb", buffering=0))
    return Source(path, _pipe_kind(path), 0, 0, pipe=True)


def _pipe_kind(path: str) -> str:
    if path != STDIN and _wanted_in_dir(PurePosixPath(path)):
        kind = _kind(PurePosixPath(path))
        if kind == "parquet":
            raise InputError(f"{path}: Parquet cannot be read from a pipe (it is read from its end); pass the file")
        return kind
    return "pipe"


def _looks_like_jsonl(head: bytes) -> bool:
    """A pipe without a telling name: JSONL when its first line is a JSON object (or starts like one and is longer
    than what was read)."""
    head = head.lstrip()
    line = head.split(b"\n", 1)[0]
    if not line.startswith(b"{"):
        return False
    if b"\n" not in head:
        return line.startswith((b'{"', b"{ "))
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class _Prefixed:
    """Bytes already read (to sniff a format), then the rest of the file: nothing here seeks, so pipes work."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if 0 <= n <= len(self.head):
            out, self.head = self.head[:n], self.head[n:]
            return out
        out, self.head = self.head, b""
        return out + self.rest.read(-1 if n < 0 else n - len(out))

    def close(self):
        self.rest.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


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
    """A binary file: local, a pipe held since discovery, or through fsspec for a URL."""
    if path in _PIPES:
        return _PIPES.pop(path)
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


def _read_exactly(f, n: int) -> bytes:
    """n bytes, fewer only at the end: a pipe's read returns what is there."""
    out = b""
    while len(out) < n and (block := f.read(n - len(out))):
        out += block
    return out


class _ZstdFrames:
    """The frames of a zstd stream, one after another. A stream that ends inside a frame is an error: zstandard's
    stream_reader reads a truncated file as far as it goes, without a word."""

    def __init__(self, raw):
        self.raw, self.dctx, self.out = raw, zstandard.ZstdDecompressor(), bytearray()
        self.frame, self.fed = self.dctx.decompressobj(), False

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.out) < n:
            block = self.raw.read(ZSTD_READ)
            if not block:
                if self.fed:
                    raise EOFError("zstd stream ends inside a frame")
                break
            while block:
                self.out += self.frame.decompress(block)
                self.fed = True
                block = b""
                if self.frame.eof:  # the frame is complete; what follows it starts the next one
                    block, self.frame, self.fed = self.frame.unused_data, self.dctx.decompressobj(), False
        n = len(self.out) if n < 0 else n
        out = bytes(self.out[:n])
        del self.out[:n]
        return out


def open_stream(raw):
    """(decompressed byte stream, counter of on-disk bytes) over an open binary file.
    Compression is sniffed from the magic bytes, not the file name."""
    magic = _read_exactly(raw, 4)
    counted = _Counted(_Prefixed(magic, raw))
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=counted), counted
    if magic[:3] == b"BZh":
        return bz2.BZ2File(counted), counted
    if magic == b"\x28\xb5\x2f\xfd":
        return _ZstdFrames(counted), counted
    return counted, counted


def _byte_units(source_id, source: Source, unit_bytes: int):
    buf, eof, index, line, reported = bytearray(), False, 0, 1, 0
    kind = boundary = hard_cap = None
    with _open(source.path) as raw:
        stream, counted = open_stream(raw)
        while buf or not eof:
            while not eof and len(buf) < unit_bytes:
                block = stream.read(unit_bytes)
                eof = not block
                buf += block
            if not buf:
                break
            if kind is None:  # a pipe tells its kind by its first line
                kind = source.kind if source.kind != "pipe" else "jsonl" if _looks_like_jsonl(buf) else "text"
                boundary = DOC_BOUNDARY if kind == "text" else RECORD_BOUNDARY
                # Plain text is cut anyway at the cap; a JSONL record cannot be cut, so a longer one is refused.
                hard_cap = HARD_CAP_UNITS * unit_bytes
            # First boundary at or after unit_bytes, looked for only below the cap so that where
            # a unit ends never depends on how many bytes a read happened to return.
            match = boundary.search(buf, unit_bytes - 1, hard_cap)
            split_lines = split_docs = 0
            if match:
                cut = match.end()
            elif eof:
                cut = len(buf)
            elif len(buf) < hard_cap:
                block = stream.read(unit_bytes)
                eof = not block
                buf += block
                continue
            elif kind == "jsonl":
                at = line + buf.count(b"\n", 0, unit_bytes - 1)  # the record that runs from before unit_bytes on
                raise InputError(
                    f"{source.path}:{at}: a JSONL record longer than {hard_cap >> 20} MB ({HARD_CAP_UNITS} x "
                    f"--unit-kb); raise --unit-kb to read it, or split the record"
                )
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

    try:
        loaded = datasets.load_from_disk(source.path)
    except Exception as e:  # datasets raises many types on a damaged directory (TypeError on a null in its JSON)
        raise InputError(
            f"{source.path}: not a readable saved `datasets` directory ({type(e).__name__}: {e}); save it again"
        ) from e
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
            yield from _byte_units(source_id, source, unit_bytes)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zstandard.ZstdError) as e:
        raise InputError(
            f"{source.path}: cannot read ({type(e).__name__}: {e}); the file is corrupt or truncated: fix or remove it"
        ) from e
