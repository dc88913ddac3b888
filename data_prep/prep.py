"""`earlybert prep`: corpus -> shards, in three restartable passes over deterministic work units.

  pass 1  encode_pass: read the input, cut it into units (readers.py), tokenize each unit and store
          its documents under OUT/.work/units/ (encode.py). Parallel over units.
  dedup   dedup_pass: one process finds the first occurrence of every document hash in the global
          order (source, unit, document) and writes OUT/.work/keep.npy.
  pass 2  sequence_pass: build the sequences of each unit from its kept documents, with a random
          generator seeded by (seed, source, unit) (sequences.py) -> OUT/.work/seqs/.
  pass 3  shard_pass: cut the global sequence order into shards of exactly --shard-sequences (the
          last one shorter), write them (shards.py); manifest_pass then writes the manifest and
          removes OUT/.work.

Nothing in the output depends on --workers or the number of MPI ranks: units are defined by the
bytes of the input, each unit's result by the unit and the seed, and shards by the global
order. Every file appears under its final name only once complete (atomic rename), so a rerun
after a crash skips every unit and shard already on disk.

Parallelism: --workers N worker processes per rank. Under mpirun or srun (mpi4py), ranks split
the input files (or, with fewer files than ranks, the units of every file), exchange only small
summaries with allgather, and rank 0 writes the manifest. Memory per process is bounded by a
unit and a shard; only the dedup step holds 16 bytes per document.
"""

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np

from common import outputs
from common.launchers import launched_tasks
from common.progress import progress_bar
from data_prep import encode, readers, sequences, shards, stops
from pipeline.run import runlock

WORK = ".work"
# A source with more of its bytes not UTF-8 than this is not text (random bytes: about half): refused.
MAX_REPLACED_FRACTION = 0.1


@dataclass
class PrepConfig:
    inputs: list[str]
    output: str
    tokenizer: str
    seq_len: int
    workers: int = 0  # 0: every usable core (1 per rank under MPI)
    nsp: bool = True
    seed: int = 12345
    short_seq_prob: float = 0.1
    dedup: bool = True
    text_field: str = "text"
    shard_sequences: int = 32768
    unit_bytes: int = 1 << 20
    max_line_chars: int = 100_000
    progress: bool = True  # a bar on a terminal, else a line now and then (progress.py)
    strict: bool = False  # skipped files and wrong-typed records stop the run instead of a warning


class PrepError(readers.InputError):
    """Stops the run (bad input or output directory); the message names the file and the fix."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    comm: object = None

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj) if self.comm is not None else [obj]


def detect_dist() -> Dist:
    """MPI only when launched as several ranks by mpirun/srun: importing mpi4py is not free and
    a plain run must not need it."""
    launched = launched_tasks(os.environ)
    if launched <= 1:
        return Dist()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise PrepError(
            f"launched as {launched} ranks but mpi4py is not importable ({e}); "
            f"pip install mpi4py, or run without mpirun/srun"
        ) from e
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launched:
        raise PrepError(
            f"launched as {launched} tasks but MPI sees {comm.Get_size()}; under Slurm use "
            f"`srun --mpi=pmix` (or pmi2) so the tasks form one MPI job"
        )
    return Dist(comm.Get_rank(), comm.Get_size(), comm)


def _step(dist: Dist, fn, *args):
    """Run fn on every rank, then agree: if any rank failed, every rank raises the first rank's error, so
    no rank waits forever in the next collective: PrepError for bad input (exit 2), stops.Failure for a failure
    during the work (exit 1)."""
    error, result = None, None
    try:
        result = fn(*args)
    except (readers.InputError, shards.ShardError, outputs.OutputError) as e:
        error = (True, str(e))
    except OSError as e:
        error = (False, f"{e} (rank {dist.rank})" if dist.world > 1 else str(e))
    except Exception:
        error = (False, f"rank {dist.rank}: internal error\n{traceback.format_exc()}")
    errors = [e for e in dist.allgather(error) if e]
    if errors:
        bad_input, message = errors[0]
        raise PrepError(message) if bad_input else stops.Failure(message)
    return result


def _log(dist: Dist, msg: str):
    if dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


# ---- what the passes share --------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer as the workers rebuild it and the manifest records it."""

    json: str  # tokenizer.json text, copied into OUT
    file: str  # where it was read from
    sha256: str
    vocab_size: int
    special: dict  # special token ids by name ("cls", "sep", ...)
    token_dtype: str  # of the token ids on disk


def load_tokenizer(path: str) -> TokenizerInfo:
    tok, text, file = encode.load_tokenizer(path)
    special = encode.special_ids(tok, file)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    return TokenizerInfo(
        text, file, hashlib.sha256(text.encode()).hexdigest(), vocab_size, special, shards.token_dtype(vocab_size).name
    )


@dataclass(frozen=True)
class WorkDir:
    """OUT/.work: what a killed run leaves for the rerun to resume from; removed once OUT is complete."""

    root: Path

    @property
    def state(self) -> Path:  # the fingerprint of the run that created it
        return self.root / "state.json"

    @property
    def keep(self) -> Path:  # dedup: keep[d] for every document in the global order
        return self.root / "keep.npy"

    def unit(self, key: str) -> Path:  # pass 1: tokenized documents of one unit
        return self.root / "units" / f"{key}.npz"

    def sequences(self, key: str) -> Path:  # pass 2: sequences of one unit
        return self.root / "seqs" / f"{key}.npz"

    def shard_entry(self, k: int) -> Path:  # pass 3: manifest entry of a written shard
        return self.root / "shards" / f"{k:05d}.json"


@dataclass(frozen=True)
class PrepRun:
    """What the passes of one run share: options, ranks, inputs and tokenizer."""

    cfg: PrepConfig
    dist: Dist
    sources: list[readers.Source]
    tokenizer: TokenizerInfo
    skipped: list[readers.Skipped]  # files of input directories that are not read
    workers: int  # worker processes of this rank (1: this process)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.out / WORK)

    @property
    def fingerprint(self) -> dict:
        """Everything the output depends on; a rerun resumes only when it is unchanged."""
        return {
            "format_version": shards.FORMAT_VERSION,
            "inputs": [[s.path, s.size, s.mtime_ns] for s in self.sources],
            "tokenizer_sha256": self.tokenizer.sha256,
            **{
                k: getattr(self.cfg, k)
                for k in (
                    "seq_len",
                    "nsp",
                    "seed",
                    "short_seq_prob",
                    "dedup",
                    "text_field",
                    "shard_sequences",
                    "unit_bytes",
                    "max_line_chars",
                )
            },
        }

    def progress_bar(self, desc: str, total: int, unit: str):
        return progress_bar(f"prep {desc}", total, unit, enabled=self.cfg.progress and self.dist.rank == 0)


# ---- worker processes -------------------------------------------------------------------
_WORKER = {}


def _init_worker(cfg: PrepConfig, tokenizer: TokenizerInfo):
    # One core per worker: the tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        cfg=cfg,
        tokenizer=tokenizer,
        tok=encode.tokenizer_from_json(tokenizer.json),
        work=WorkDir(Path(cfg.output) / WORK),
    )


def _save_npz(path: Path, arrays: dict):
    outputs.atomic_write(path, lambda f: np.savez(f, **arrays))


def _unit_summary(key, source, arrays, nbytes, resumed=False) -> dict:
    return {
        "key": key,
        "source": source,
        "documents": len(arrays["doc_lines"]),
        "tokens": len(arrays["tokens"]),
        "stats": arrays["stats"].tolist(),
        "wrong_type_lines": arrays["wrong_type_lines"].tolist(),
        "nbytes": nbytes,
        "resumed": resumed,
    }


def _encode_job(unit: readers.Unit) -> dict:
    cfg = _WORKER["cfg"]
    arrays = encode.encode_unit(
        unit,
        _WORKER["tok"],
        text_field=cfg.text_field,
        max_line_chars=cfg.max_line_chars,
        token_dtype=_WORKER["tokenizer"].token_dtype,
    )
    _save_npz(_WORKER["work"].unit(unit.key), arrays)
    return _unit_summary(unit.key, unit.source, arrays, unit.nbytes)


def _sequence_job(job) -> dict:
    key, source, index, keep = job
    cfg, work, special = _WORKER["cfg"], _WORKER["work"], _WORKER["tokenizer"].special
    path = work.sequences(key)
    with np.load(work.unit(key)) as z:
        arrays = dict(z)
    doc_tokens = (
        np.add.reduceat(arrays["line_tokens"], np.cumsum(arrays["doc_lines"]) - arrays["doc_lines"])
        if len(arrays["doc_lines"])
        else np.zeros(0, np.int64)
    )
    if not path.exists():
        tokens, table = sequences.build_sequences(
            arrays,
            keep,
            nsp=cfg.nsp,
            seq_len=cfg.seq_len,
            short_seq_prob=cfg.short_seq_prob,
            rng=sequences.unit_rng(cfg.seed, source, index),
            cls=special["cls"],
            sep=special["sep"],
        )
        _save_npz(path, {"tokens": tokens, "table": table})
    with np.load(path) as z:
        return {"key": key, "sequences": len(z["table"]), "document_tokens": int(doc_tokens[keep].sum())}


def _shard_job(job) -> dict:
    """Write shard k from slices [lo, hi) of the units' sequence files."""
    k, pieces = job
    work, out = _WORKER["work"], Path(_WORKER["cfg"].output)
    entry_path = work.shard_entry(k)
    if entry_path.exists():
        return json.loads(entry_path.read_text())
    toks, tables = [], []
    for key, lo, hi in pieces:
        with np.load(work.sequences(key)) as z:
            table, tokens = z["table"], z["tokens"]
        starts = np.concatenate([[0], np.cumsum(table[:, 0], dtype=np.int64)])
        toks.append(tokens[starts[lo] : starts[hi]])
        tables.append(table[lo:hi])
    tokens, table = np.concatenate(toks), np.concatenate(tables)
    starts = np.concatenate([[0], np.cumsum(table[:-1, 0], dtype=np.int64)])
    index = np.column_stack([starts, table]).astype(np.int32)
    entry = shards.write_shard(out, k, tokens, index)
    outputs.write_json(entry_path, entry)
    return entry


@dataclass
class Workers:
    """This rank's worker processes; pool None: one worker, this process."""

    pool: Pool | None
    window: int  # jobs in flight at most

    def map(self, fn, items):
        """Ordered map that keeps at most `window` items in flight: Pool.imap would read the whole
        input ahead of the workers."""
        if self.pool is None:
            yield from map(fn, items)
            return
        pending = deque()
        for item in items:
            pending.append(self.pool.apply_async(fn, (item,)))
            if len(pending) >= self.window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextmanager
def start_workers(run: PrepRun):
    """The worker processes of this rank. Anything but success (bad input, Ctrl-C, SIGTERM) terminates them at
    once: their queued work is useless, and close() would wait for results that a dead worker never sends."""
    n = run.workers
    window = 2 * n + 2
    if n <= 1:
        _init_worker(run.cfg, run.tokenizer)
        yield Workers(None, window)
        return
    # fork is cheapest; an MPI process must not fork, so it uses a fork server.
    ctx = mp.get_context("forkserver" if run.dist.world > 1 else "fork")
    pool = stops.start_pool(ctx, n, _init_worker, (run.cfg, run.tokenizer))
    try:
        yield Workers(pool, window)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def _run_jobs(run: PrepRun, workers: Workers, desc: str, unit: str, fn, jobs) -> list:
    """fn over this rank's jobs, in order, counted by a progress bar."""
    results = []
    with run.progress_bar(desc, len(jobs), unit) as bar:
        for result in workers.map(fn, jobs):
            results.append(result)
            bar.update(1)
    return results


# ---- before the passes ------------------------------------------------------------------
def _validate(cfg: PrepConfig):
    """Each option on its own, so that the message names the one that is wrong."""
    if not 8 <= cfg.seq_len <= shards.MAX_SEQ_LEN:
        raise PrepError(f"--seq-len {cfg.seq_len}: must be in [8, {shards.MAX_SEQ_LEN}] (BERT uses 128, then 512)")
    if cfg.shard_sequences < 1:
        raise PrepError(f"--shard-sequences {cfg.shard_sequences}: must be >= 1")
    if cfg.shard_sequences * cfg.seq_len > shards.MAX_SHARD_TOKENS:
        raise PrepError(
            f"--shard-sequences {cfg.shard_sequences}: at --seq-len {cfg.seq_len} a shard could hold more tokens "
            f"than its int32 index addresses; at most {shards.MAX_SHARD_TOKENS // cfg.seq_len}"
        )
    if cfg.unit_bytes < 1024:
        raise PrepError(f"--unit-kb {cfg.unit_bytes // 1024}: must be >= 1")
    if cfg.max_line_chars < 16:
        raise PrepError(f"--max-line-chars {cfg.max_line_chars}: must be >= 16")
    if not 0 <= cfg.short_seq_prob <= 1:
        raise PrepError(f"--short-seq-prob {cfg.short_seq_prob}: must be in [0, 1]")
    if cfg.workers < 0:
        raise PrepError(f"--workers {cfg.workers}: must be >= 0 (0: every usable core)")


def _worker_count(cfg: PrepConfig, dist: Dist) -> int:
    """--workers, at most one per usable core: more only adds processes (the output is the same for any count)."""
    cores = len(os.sched_getaffinity(0))
    if not cfg.workers:
        return 1 if dist.world > 1 else cores
    if cfg.workers > cores:
        _log(dist, f"--workers {cfg.workers}: this process may use {cores} cores; starting {cores} workers")
    return min(cfg.workers, cores)


def _check_inputs(cfg: PrepConfig, dist: Dist, sources: list[readers.Source]):
    if cfg.text_field != "text" and all(s.kind == "text" for s in sources):
        raise PrepError(
            f"--text-field {cfg.text_field}: every input is plain text, which has no fields "
            f"({sources[0].path}); --text-field is for JSONL, Parquet and `datasets` input"
        )
    pipes = [s.path for s in sources if s.kind == "pipe" or s.path == readers.STDIN]
    if pipes and dist.world > 1:
        raise PrepError(f"{pipes[0]}: a pipe can be read by one rank only; run without mpirun/srun, or pass files")
    outputs.check_output(cfg.output, [*readers.local_paths(cfg.inputs, sources), cfg.tokenizer])


def open_run(cfg: PrepConfig) -> PrepRun:
    """Check the options, the ranks, the inputs, the output and the tokenizer: what can fail before anything is
    written."""
    _validate(cfg)
    dist = detect_dist()
    skipped = []
    sources = readers.discover(cfg.inputs, skipped)
    _check_inputs(cfg, dist, sources)
    if skipped and cfg.strict:
        raise PrepError(f"--strict: {readers.describe_skipped(skipped)}")
    return PrepRun(cfg, dist, sources, load_tokenizer(cfg.tokenizer), skipped, _worker_count(cfg, dist))


def _check_output(out: Path, fingerprint: dict, tokenizer_file: str) -> bool:
    """True when OUT already holds this exact prep. Refuses, without touching anything, an
    OUT written from other inputs, options or another tokenizer."""
    found = None
    for path in (out / shards.MANIFEST, WorkDir(out / WORK).state):
        if path.is_file():
            try:
                found = path, json.loads(path.read_text())
            except ValueError as e:
                raise PrepError(f"{path}: unreadable ({e}); delete {out} or choose another --output") from e
            break
    if found is None:
        if any(out.glob("shard_*.npy")):
            raise PrepError(
                f"{out}: holds shard files but no manifest.json or {WORK}/state.json; "
                f"delete them or choose another --output"
            )
        return False
    path, data = found
    old = data["fingerprint"]
    if old == fingerprint:
        return path.name == shards.MANIFEST
    if old.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
        # state.json names the tokenizer file as given; a finished manifest records it under "tokenizer".
        written_with = data.get("tokenizer_file") or data.get("tokenizer", {}).get("source", "?")
        raise PrepError(
            f"{path}: {out} was written with another tokenizer ({written_with}, sha256 "
            f"{old.get('tokenizer_sha256', '?')[:12]}), not {tokenizer_file} (sha256 "
            f"{fingerprint['tokenizer_sha256'][:12]}); choose another --output or delete {out}"
        )
    changed = ", ".join(k for k in fingerprint if old.get(k) != fingerprint[k])
    raise PrepError(
        f"{path}: {out} was written with different {changed}; rerun with the same inputs and "
        f"options to resume, or choose another --output or delete {out}"
    )


def _already_complete(run: PrepRun) -> dict:
    if run.dist.rank == 0:  # a crash between the manifest and this clean-up leaves .work behind
        shutil.rmtree(run.work.root, ignore_errors=True)
    _log(run.dist, f"{run.out}: already complete with these inputs and options; nothing to do")
    return json.loads((run.out / shards.MANIFEST).read_text())


def _create_work_dir(run: PrepRun):
    if run.dist.rank == 0:
        for sub in ("units", "seqs", "shards"):
            (run.work.root / sub).mkdir(parents=True, exist_ok=True)
        outputs.write_json(run.work.state, {"fingerprint": run.fingerprint, "tokenizer_file": run.tokenizer.file})


@contextmanager
def open_work_dir(run: PrepRun):
    """Create OUT/.work, or reuse the one a killed run left. A fresh run stopped by bad input leaves
    nothing behind; an interrupted one keeps .work so that the rerun resumes."""
    fresh = not run.work.state.exists()
    _step(run.dist, _create_work_dir, run)
    try:
        yield run.work
    except readers.InputError:
        if fresh and run.dist.rank == 0:
            shutil.rmtree(run.work.root, ignore_errors=True)
        raise


# ---- pass 1: encode ---------------------------------------------------------------------
def _assign(sources, dist: Dist):
    """(files this rank reads, predicate on (file, unit) for the units it processes)."""
    if dist.world == 1:
        return list(range(len(sources))), lambda f, u: True
    if len(sources) >= dist.world:
        # Largest files first onto the least-loaded rank: deterministic and balanced.
        load, mine = [0] * dist.world, []
        for f in sorted(range(len(sources)), key=lambda f: (-sources[f].size, f)):
            r = min(range(dist.world), key=lambda r: (load[r], r))
            load[r] += sources[f].size
            if r == dist.rank:
                mine.append(f)
        return sorted(mine), lambda f, u: True
    return list(range(len(sources))), lambda f, u: (f + u) % dist.world == dist.rank


def _units_to_encode(run: PrepRun, files, is_mine, resumed: list, bar):
    """This rank's units not yet on disk; the summaries of those that are go to `resumed`."""
    for f in files:
        for unit in readers.read_units(f, run.sources[f], run.cfg.unit_bytes, run.cfg.text_field):
            if not is_mine(f, unit.index):
                continue
            path = run.work.unit(unit.key)
            if path.exists():
                with np.load(path) as z:
                    resumed.append(_unit_summary(unit.key, f, z, unit.nbytes, resumed=True))
                bar.update(unit.nbytes)
                continue
            yield unit


def _encode_my_units(run: PrepRun, workers: Workers) -> list[dict]:
    files, is_mine = _assign(run.sources, run.dist)
    done, resumed = [], []
    start, docs, tokens = time.time(), 0, 0
    with run.progress_bar("encode", sum(run.sources[f].size for f in files), "B") as bar:
        for summary in workers.map(_encode_job, _units_to_encode(run, files, is_mine, resumed, bar)):
            done.append(summary)
            docs, tokens = docs + summary["documents"], tokens + summary["tokens"]
            bar.update(summary["nbytes"])
            bar.set_postfix(docs=docs, tok_s=f"{tokens / max(time.time() - start, 1e-9):.3g}", refresh=False)
    return done + resumed


def encode_pass(run: PrepRun, workers: Workers) -> list[dict]:
    """Pass 1: tokenize this rank's units (those a killed run finished are only read back); returns the
    summaries of every rank's units in the global order."""
    mine = _step(run.dist, _encode_my_units, run, workers)
    return sorted((u for part in run.dist.allgather(mine) for u in part), key=lambda u: u["key"])


def _per_source(units) -> dict:
    """{source: (its units' statistics summed, the first line numbers of its wrong-typed records)}"""
    per_source = {}
    for u in units:
        stats, lines = per_source.get(u["source"], (np.zeros(len(encode.STATS), np.int64), []))
        per_source[u["source"]] = stats + u["stats"], lines + u["wrong_type_lines"]
    return per_source


def _check_bad_input(run: PrepRun, units):
    """Warn about what was skipped, replaced or cut, per file; refuse a file that is mostly not UTF-8 and, with
    --strict, anything skipped."""
    notes = {
        "empty_documents": "empty documents skipped",
        "replaced_bytes": "non-UTF-8 bytes replaced with U+FFFD",
        "split_lines": "over-long lines split (every piece kept)",
        "split_documents": "documents without blank lines cut",
    }
    if run.skipped:
        _log(run.dist, f"warning: {readers.describe_skipped(run.skipped)}")
    wrong = []
    for f, (stats, lines) in sorted(_per_source(units).items()):
        path, count = run.sources[f].path, dict(zip(encode.STATS, stats.tolist()))
        for name, note in notes.items():
            if count[name]:
                _log(run.dist, f"warning: {path}: {count[name]} {note}")
        if count["replaced_bytes"] > MAX_REPLACED_FRACTION * max(count["input_bytes"], 1):
            raise PrepError(
                f"{path}: {count['replaced_bytes']} of its {count['input_bytes']} bytes "
                f"({count['replaced_bytes'] / count['input_bytes']:.0%}) are not UTF-8: not text, or text in "
                f"another encoding (convert it, e.g. iconv -f latin1 -t utf-8); nothing was written"
            )
        if count["wrong_type"]:
            at = ", ".join(map(str, lines)) + (" ..." if count["wrong_type"] > len(lines) else "")
            wrong.append(
                f"{path}: {count['wrong_type']} records whose {run.cfg.text_field!r} is not a string "
                f"(a number, null, a list or an object), lines {at}"
            )
    for message in wrong:
        _log(run.dist, f"warning: {message}: skipped")
    if wrong and run.cfg.strict:
        raise PrepError(f"--strict: {wrong[0]}")


def _input_stats(run: PrepRun, units) -> dict:
    """The units' statistics summed; stops the run when no input holds a document (an empty input
    file has no unit at all)."""
    totals = np.array([u["stats"] for u in units], dtype=np.int64).reshape(-1, len(encode.STATS)).sum(axis=0)
    stats = dict(zip(encode.STATS, totals.tolist()))
    if stats["input_documents"] == 0:
        sources = run.sources
        why = (
            f"every record's {run.cfg.text_field!r} is empty or not a string (see the warnings above)"
            if stats["wrong_type"]
            else "every input is empty or blank"
        )
        raise PrepError(
            f"no documents in {', '.join(s.path for s in sources[:5])}"
            f"{' ...' if len(sources) > 5 else ''}: {why}; nothing was written"
        )
    return stats


# ---- dedup ------------------------------------------------------------------------------
def _write_keep(run: PrepRun, units):
    if run.dist.rank != 0:
        return
    if not run.cfg.dedup:
        keep = np.ones(sum(u["documents"] for u in units), dtype=bool)
    else:
        hashes = []
        with run.progress_bar("dedup", len(units), "units") as bar:
            for u in units:
                hashes.append(np.load(run.work.unit(u["key"]))["doc_hash"])
                bar.update(1)
        hashes = np.concatenate(hashes)
        keep = np.zeros(len(hashes), dtype=bool)
        # np.unique's return_index gives the first occurrence of each value (stable sort).
        keep[np.unique(np.ascontiguousarray(hashes).view("V16").ravel(), return_index=True)[1]] = True
    shards.save_npy(run.work.keep, keep)


def dedup_pass(run: PrepRun, units) -> np.ndarray:
    """keep[d] for every document in the global order: False for a repeat of an earlier one.
    Rank 0 computes it, every rank reads it back."""
    _step(run.dist, _write_keep, run, units)
    return np.load(run.work.keep)


# ---- pass 2: sequences ------------------------------------------------------------------
def sequence_pass(run: PrepRun, workers: Workers, units, keep) -> dict:
    """Pass 2: the sequences of this rank's units; returns {unit key: {"sequences", "document_tokens"}}
    for every rank's units."""
    offsets = np.concatenate([[0], np.cumsum([u["documents"] for u in units])])
    jobs = [
        (u["key"], *map(int, u["key"].split("-")), keep[offsets[i] : offsets[i + 1]])
        for i, u in enumerate(units)
        if i % run.dist.world == run.dist.rank
    ]
    mine = _step(run.dist, _run_jobs, run, workers, "sequences", "units", _sequence_job, jobs)
    return {r["key"]: r for part in run.dist.allgather(mine) for r in part}


# ---- pass 3: shards ---------------------------------------------------------------------
def shard_plan(units, counts, shard_sequences) -> list[list[tuple]]:
    """For each shard: [(unit key, lo, hi)] slices of the units' sequences, in global order."""
    total = sum(counts)
    plan = [[] for _ in range(-(-total // shard_sequences))]
    pos = 0
    for u, n in zip(units, counts):
        lo = 0
        while lo < n:
            k = (pos + lo) // shard_sequences
            hi = min(n, (k + 1) * shard_sequences - pos)
            plan[k].append((u["key"], lo, hi))
            lo = hi
        pos += n
    return plan


def shard_pass(run: PrepRun, workers: Workers, plan):
    """Pass 3: write this rank's shards of the plan (a shard already written is kept)."""
    jobs = [(k, p) for k, p in enumerate(plan) if k % run.dist.world == run.dist.rank]
    _step(run.dist, _run_jobs, run, workers, "shards", "shards", _shard_job, jobs)


# ---- manifest ---------------------------------------------------------------------------
def manifest_pass(run: PrepRun, n_shards: int, keep, built: dict, stats: dict) -> dict | None:
    """Rank 0: copy the tokenizer, then write manifest.json, last (its presence marks OUT complete), and
    remove .work. Returns the manifest's counts (None on other ranks)."""
    if run.dist.rank != 0:
        return None
    cfg, out, tokenizer = run.cfg, run.out, run.tokenizer
    entries = [json.loads(run.work.shard_entry(k).read_text()) for k in range(n_shards)]
    outputs.atomic_write(out / "tokenizer.json", lambda f: f.write(tokenizer.json.encode()))
    counts = {
        "documents": int(keep.sum()),
        "duplicates_dropped": int(len(keep) - keep.sum()),
        "sequences": sum(e["sequences"] for e in entries),
        "tokens": sum(e["token_count"] for e in entries),
        "document_tokens": sum(r["document_tokens"] for r in built.values()),
        **stats,
    }
    shards.write_manifest(
        out,
        max_token_id=max(e["max_token_id"] for e in entries),
        seq_len=cfg.seq_len,
        shard_sequences=cfg.shard_sequences,
        token_dtype=tokenizer.token_dtype,
        counts=counts,
        tokenizer={
            "file": "tokenizer.json",
            "source": tokenizer.file,
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "special_ids": tokenizer.special,
        },
        seed=cfg.seed,
        options={
            k: getattr(cfg, k) for k in ("nsp", "short_seq_prob", "dedup", "text_field", "unit_bytes", "max_line_chars")
        },
        inputs=[{"path": s.path, "kind": s.kind, "bytes": s.size} for s in run.sources],
        shards=entries,
        fingerprint=run.fingerprint,
    )
    shutil.rmtree(run.work.root)
    for partial in out.glob(".*.tmp*"):  # left by a killed run: never listed, now removed
        if partial.name[1:].startswith(("shard_", shards.MANIFEST, "tokenizer.json")):  # prep's own only
            partial.unlink()
    return counts


# ---- the run ----------------------------------------------------------------------------
def _summary(run: PrepRun, counts: dict, units, n_shards: int, seconds: float) -> str:
    n_resumed = sum(u["resumed"] for u in units)
    resumed = f", {n_resumed} of {len(units)} units resumed from an earlier run" if n_resumed else ""
    return (
        f"{run.out}: {counts['documents']} documents ({counts['duplicates_dropped']} duplicates dropped), "
        f"{counts['sequences']} sequences of <= {run.cfg.seq_len} tokens in {n_shards} shards, "
        f"{sum(u['tokens'] for u in units) / seconds:,.0f} tokens/s, {seconds:.1f} s{resumed}"
    )


def run_prep(cfg: PrepConfig) -> dict:
    """Prepare cfg.output from cfg.inputs; returns the manifest. Raises PrepError on bad input."""
    started = time.time()
    run = open_run(cfg)
    fresh = not run.out.exists()
    lock = _step(run.dist, _lock_output, run)
    try:
        return _prepare(run, started)
    finally:
        if lock is not None:
            runlock.release(lock)
            if fresh and not any(run.out.iterdir()):  # stopped before writing anything: leave nothing
                run.out.rmdir()


def _lock_output(run: PrepRun) -> Path | None:
    """OUT's lock (pipeline/run/runlock.py), held by rank 0: a second prep into OUT is refused."""
    if run.dist.rank != 0:
        return None
    if run.out.exists() and not run.out.is_dir():
        raise PrepError(f"{run.out}: exists and is not a directory; choose another --output")
    try:
        return runlock.acquire(run.out, "earlybert prep")
    except runlock.LockError as e:
        raise PrepError(str(e)) from None
    except OSError as e:  # outputs.check_output saw a writable directory above; something changed since
        raise PrepError(f"--output {run.out}: cannot create it ({e.strerror or e}); choose another --output") from e


def _prepare(run: PrepRun, started: float) -> dict:
    cfg = run.cfg
    if _step(run.dist, _check_output, run.out, run.fingerprint, run.tokenizer.file):
        return _already_complete(run)
    with open_work_dir(run), start_workers(run) as workers:
        units = encode_pass(run, workers)
        _check_bad_input(run, units)
        stats = _input_stats(run, units)
        keep = dedup_pass(run, units)
        built = sequence_pass(run, workers, units, keep)
        plan = shard_plan(units, [built[u["key"]]["sequences"] for u in units], cfg.shard_sequences)
        shard_pass(run, workers, plan)
    counts = _step(run.dist, manifest_pass, run, len(plan), keep, built, stats)
    if counts is not None:
        _log(run.dist, _summary(run, counts, units, len(plan), time.time() - started))
    return json.loads((run.out / shards.MANIFEST).read_text())
