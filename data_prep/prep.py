"""`earlybert prep`: corpus -> shards, in three restartable passes over deterministic work units.

  pass 1  read the input, cut it into units (readers.py), tokenize each unit and store its
          documents under OUT/.work/units/ (encode.py). Parallel over units.
  dedup   one process finds the first occurrence of every document hash in the global order
          (source, unit, document) and writes OUT/.work/keep.npy.
  pass 2  build the sequences of each unit from its kept documents, with a random generator
          seeded by (seed, source, unit) (sequences.py) -> OUT/.work/seqs/.
  pass 3  cut the global sequence order into shards of exactly --shard-sequences (the last
          one shorter), write them (shards.py), then the manifest; OUT/.work is removed.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import encode, readers, sequences, shards

WORK = ".work"


@dataclass
class PrepConfig:
    inputs: list[str]
    output: str
    tokenizer: str
    seq_len: int
    workers: int = 0          # 0: every usable core (1 per rank under MPI)
    nsp: bool = True
    seed: int = 12345
    short_seq_prob: float = 0.1
    dedup: bool = True
    text_field: str = "text"
    shard_sequences: int = 32768
    unit_bytes: int = 1 << 20
    max_line_chars: int = 100_000
    progress: bool | None = None  # None: when stderr is a terminal


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
    launched = max(int(os.environ.get(v) or 1) for v in
                   ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"))
    if launched <= 1:
        return Dist()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise PrepError(f"launched as {launched} ranks but mpi4py is not importable ({e}); "
                        f"pip install mpi4py, or run without mpirun/srun") from e
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launched:
        raise PrepError(f"launched as {launched} tasks but MPI sees {comm.Get_size()}; under Slurm use "
                        f"`srun --mpi=pmix` (or pmi2) so the tasks form one MPI job")
    return Dist(comm.Get_rank(), comm.Get_size(), comm)


def _step(dist: Dist, fn, *args):
    """Run fn on every rank, then agree: if any rank failed, every rank raises its message, so
    no rank waits forever in the next collective."""
    error, result = None, None
    try:
        result = fn(*args)
    except (readers.InputError, shards.ShardError) as e:
        error = str(e)
    except Exception:
        error = f"rank {dist.rank}: internal error\n{traceback.format_exc()}"
    errors = [e for e in dist.allgather(error) if e]
    if errors:
        raise PrepError(errors[0])
    return result


# ---- worker processes -------------------------------------------------------------------
_WORKER = {}


def _init_worker(cfg: PrepConfig, tokenizer_json: str, token_dtype: str, special: dict):
    # One core per worker: the tokenizer's own thread pool would oversubscribe the machine.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(cfg=cfg, tok=encode.tokenizer_from_json(tokenizer_json), dtype=token_dtype,
                   special=special, work=Path(cfg.output) / WORK)


def _save_npz(path: Path, arrays: dict):
    shards.atomic_write(path, lambda f: np.savez(f, **arrays))


def _unit_summary(key, source, arrays, nbytes, resumed=False) -> dict:
    return {"key": key, "source": source, "documents": len(arrays["doc_lines"]), "tokens": len(arrays["tokens"]),
            "stats": arrays["stats"].tolist(), "nbytes": nbytes, "resumed": resumed}


def _encode_job(unit: readers.Unit) -> dict:
    cfg = _WORKER["cfg"]
    arrays = encode.encode_unit(unit, _WORKER["tok"], text_field=cfg.text_field,
                                max_line_chars=cfg.max_line_chars, token_dtype=_WORKER["dtype"])
    _save_npz(_WORKER["work"] / "units" / f"{unit.key}.npz", arrays)
    return _unit_summary(unit.key, unit.source, arrays, unit.nbytes)


def _sequence_job(job) -> dict:
    key, source, index, keep = job
    cfg, work = _WORKER["cfg"], _WORKER["work"]
    path = work / "seqs" / f"{key}.npz"
    with np.load(work / "units" / f"{key}.npz") as z:
        arrays = dict(z)
    doc_tokens = np.add.reduceat(arrays["line_tokens"], np.cumsum(arrays["doc_lines"]) - arrays["doc_lines"]) \
        if len(arrays["doc_lines"]) else np.zeros(0, np.int64)
    if not path.exists():
        tokens, table = sequences.build_sequences(
            arrays, keep, nsp=cfg.nsp, seq_len=cfg.seq_len, short_seq_prob=cfg.short_seq_prob,
            rng=sequences.unit_rng(cfg.seed, source, index), cls=_WORKER["special"]["cls"],
            sep=_WORKER["special"]["sep"])
        _save_npz(path, {"tokens": tokens, "table": table})
    with np.load(path) as z:
        return {"key": key, "sequences": len(z["table"]), "document_tokens": int(doc_tokens[keep].sum())}


def _shard_job(job) -> dict:
    """Write shard k from slices [lo, hi) of the units' sequence files."""
    k, pieces = job
    work, out = _WORKER["work"], Path(_WORKER["cfg"].output)
    entry_path = work / "shards" / f"{k:05d}.json"
    if entry_path.exists():
        return json.loads(entry_path.read_text())
    toks, tables = [], []
    for key, lo, hi in pieces:
        with np.load(work / "seqs" / f"{key}.npz") as z:
            table, tokens = z["table"], z["tokens"]
        starts = np.concatenate([[0], np.cumsum(table[:, 0], dtype=np.int64)])
        toks.append(tokens[starts[lo]:starts[hi]])
        tables.append(table[lo:hi])
    tokens, table = np.concatenate(toks), np.concatenate(tables)
    starts = np.concatenate([[0], np.cumsum(table[:-1, 0], dtype=np.int64)])
    index = np.column_stack([starts, table]).astype(np.int32)
    entry = shards.write_shard(out, k, tokens, index)
    shards.write_json(entry_path, entry)
    return entry


def _imap(pool, fn, items, window: int):
    """Ordered map that keeps at most `window` items in flight: Pool.imap would read the whole
    input ahead of the workers."""
    if pool is None:
        yield from map(fn, items)
        return
    pending = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---- the run ----------------------------------------------------------------------------
def _log(dist: Dist, msg: str):
    if dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


def _fingerprint(cfg: PrepConfig, sources, tokenizer_sha: str) -> dict:
    """Everything the output depends on; a rerun resumes only when it is unchanged."""
    return {
        "format_version": shards.FORMAT_VERSION,
        "inputs": [[s.path, s.size, s.mtime_ns] for s in sources],
        "tokenizer_sha256": tokenizer_sha,
        **{k: getattr(cfg, k) for k in ("seq_len", "nsp", "seed", "short_seq_prob", "dedup", "text_field",
                                        "shard_sequences", "unit_bytes", "max_line_chars")},
    }


def _check_output(out: Path, fingerprint: dict, tokenizer_file: str) -> bool:
    """True when OUT already holds this exact prep. Refuses, without touching anything, an
    OUT written from other inputs, options or another tokenizer."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"{out}: exists and is not a directory; choose another --output")
    found = None
    for path in (out / shards.MANIFEST, out / WORK / "state.json"):
        if path.is_file():
            try:
                found = path, json.loads(path.read_text())
            except ValueError as e:
                raise PrepError(f"{path}: unreadable ({e}); delete {out} or choose another --output") from e
            break
    if found is None:
        if any(out.glob("shard_*.npy")):
            raise PrepError(f"{out}: holds shard files but no manifest.json or {WORK}/state.json; "
                            f"delete them or choose another --output")
        return False
    path, data = found
    old = data["fingerprint"]
    if old == fingerprint:
        return path.name == shards.MANIFEST
    if old.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
        # state.json names the tokenizer file as given; a finished manifest records it under "tokenizer".
        written_with = data.get("tokenizer_file") or data.get("tokenizer", {}).get("source", "?")
        raise PrepError(f"{path}: {out} was written with another tokenizer ({written_with}, sha256 "
                        f"{old.get('tokenizer_sha256', '?')[:12]}), not {tokenizer_file} (sha256 "
                        f"{fingerprint['tokenizer_sha256'][:12]}); choose another --output or delete {out}")
    changed = ", ".join(k for k in fingerprint if old.get(k) != fingerprint[k])
    raise PrepError(f"{path}: {out} was written with different {changed}; rerun with the same inputs and "
                    f"options to resume, or choose another --output or delete {out}")


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


def _progress(cfg, dist, total):
    from tqdm import tqdm

    disable = dist.rank != 0 or (not sys.stderr.isatty() if cfg.progress is None else not cfg.progress)
    return tqdm(total=total, unit="B", unit_scale=True, desc="prep", disable=disable, smoothing=0.1)


def _pass1(cfg, sources, dist, pool, window, work):
    files, mine = _assign(sources, dist)
    done, resumed = [], []
    bar = _progress(cfg, dist, sum(sources[f].size for f in files))
    start, docs, tokens = time.time(), 0, 0

    def todo():
        for f in files:
            for unit in readers.read_units(f, sources[f], cfg.unit_bytes, cfg.text_field):
                if not mine(f, unit.index):
                    continue
                path = work / "units" / f"{unit.key}.npz"
                if path.exists():
                    with np.load(path) as z:
                        resumed.append(_unit_summary(unit.key, f, z, unit.nbytes, resumed=True))
                    bar.update(unit.nbytes)
                    continue
                yield unit

    with bar:
        for summary in _imap(pool, _encode_job, todo(), window):
            done.append(summary)
            docs, tokens = docs + summary["documents"], tokens + summary["tokens"]
            bar.update(summary["nbytes"])
            bar.set_postfix(docs=docs, tok_s=f"{tokens / max(time.time() - start, 1e-9):.3g}", refresh=False)
    return done + resumed


def _warn_bad_input(dist, sources, units):
    per_source = {}
    for u in units:
        per_source[u["source"]] = per_source.get(u["source"], np.zeros(len(encode.STATS), np.int64)) + u["stats"]
    notes = {"empty_documents": "empty documents skipped", "replaced_bytes": "non-UTF-8 bytes replaced with U+FFFD",
             "split_lines": "over-long lines split", "split_documents": "documents without blank lines cut"}
    for f in sorted(per_source):
        for name, note in notes.items():
            n = int(per_source[f][encode.STATS.index(name)])
            if n:
                _log(dist, f"warning: {sources[f].path}: {n} {note}")


def _dedup(units, work: Path, enabled: bool) -> np.ndarray:
    """keep[d] for every document in the global order: False for a repeat of an earlier one."""
    if not enabled:
        return np.ones(sum(u["documents"] for u in units), dtype=bool)
    hashes = np.concatenate([np.load(work / "units" / f"{u['key']}.npz")["doc_hash"] for u in units])
    keep = np.zeros(len(hashes), dtype=bool)
    # np.unique's return_index gives the first occurrence of each value (stable sort).
    keep[np.unique(np.ascontiguousarray(hashes).view("V16").ravel(), return_index=True)[1]] = True
    return keep


def _shard_plan(units, counts, shard_sequences):
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


def _validate(cfg: PrepConfig):
    if cfg.seq_len < 8:
        raise PrepError(f"--seq-len {cfg.seq_len}: too short (BERT uses 128, then 512)")
    if cfg.shard_sequences < 1 or cfg.shard_sequences * cfg.seq_len > shards.MAX_SHARD_TOKENS:
        raise PrepError(f"--shard-sequences {cfg.shard_sequences}: must be >= 1 and at most "
                        f"{shards.MAX_SHARD_TOKENS // cfg.seq_len} at --seq-len {cfg.seq_len}")
    if cfg.unit_bytes < 1024 or cfg.max_line_chars < 16 or not 0 <= cfg.short_seq_prob <= 1:
        raise PrepError("--unit-kb must be >= 1, --max-line-chars >= 16, --short-seq-prob in [0, 1]")


def run_prep(cfg: PrepConfig) -> dict:
    """Prepare cfg.output from cfg.inputs; returns the manifest. Raises PrepError on bad input."""
    started = time.time()
    _validate(cfg)
    dist = detect_dist()
    sources = readers.discover(cfg.inputs)
    tok, tok_json, tok_file = encode.load_tokenizer(cfg.tokenizer)
    special = encode.special_ids(tok, tok_file)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok_sha = hashlib.sha256(tok_json.encode()).hexdigest()
    out, work = Path(cfg.output), Path(cfg.output) / WORK
    fingerprint = _fingerprint(cfg, sources, tok_sha)
    if _step(dist, _check_output, out, fingerprint, tok_file):
        if dist.rank == 0:  # a crash between the manifest and this clean-up leaves .work behind
            shutil.rmtree(work, ignore_errors=True)
        _log(dist, f"{out}: already complete with these inputs and options; nothing to do")
        return json.loads((out / shards.MANIFEST).read_text())

    def create_work():
        if dist.rank == 0:
            for sub in ("units", "seqs", "shards"):
                (work / sub).mkdir(parents=True, exist_ok=True)
            shards.write_json(work / "state.json", {"fingerprint": fingerprint, "tokenizer_file": tok_file})
    fresh = not (work / "state.json").exists()
    _step(dist, create_work)

    workers = cfg.workers or (1 if dist.world > 1 else len(os.sched_getaffinity(0)))
    dtype = shards.token_dtype(vocab_size).name
    init = (cfg, tok_json, dtype, special)
    pool = None
    if workers > 1:
        # fork is cheapest; an MPI process must not fork, so it uses a fork server.
        ctx = mp.get_context("forkserver" if dist.world > 1 else "fork")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=init)
    else:
        _init_worker(*init)
    window = 2 * workers + 2
    bad_input = False
    try:
        mine = _step(dist, _pass1, cfg, sources, dist, pool, window, work)
        units = sorted((u for part in dist.allgather(mine) for u in part), key=lambda u: u["key"])
        n_resumed = sum(u["resumed"] for u in units)
        _warn_bad_input(dist, sources, units)
        stats = dict(zip(encode.STATS, np.sum([u["stats"] for u in units], axis=0, dtype=np.int64).tolist()))
        if stats["input_documents"] == 0:
            raise PrepError(f"no documents in {', '.join(s.path for s in sources[:5])}"
                            f"{' ...' if len(sources) > 5 else ''}: every input is empty or blank; "
                            f"nothing was written")

        def dedup():
            if dist.rank == 0:
                shards.save_npy(work / "keep.npy", _dedup(units, work, cfg.dedup))
        _step(dist, dedup)
        keep = np.load(work / "keep.npy")
        offsets = np.concatenate([[0], np.cumsum([u["documents"] for u in units])])
        jobs = [(u["key"], *map(int, u["key"].split("-")), keep[offsets[i]:offsets[i + 1]])
                for i, u in enumerate(units) if i % dist.world == dist.rank]
        mine = _step(dist, lambda: list(_imap(pool, _sequence_job, jobs, window)))
        built = {r["key"]: r for part in dist.allgather(mine) for r in part}
        plan = _shard_plan(units, [built[u["key"]]["sequences"] for u in units], cfg.shard_sequences)
        jobs = [(k, p) for k, p in enumerate(plan) if k % dist.world == dist.rank]
        _step(dist, lambda: list(_imap(pool, _shard_job, jobs, window)))
    except readers.InputError:
        bad_input = True
        raise
    finally:
        if pool is not None:
            (pool.terminate if bad_input else pool.close)()
            pool.join()
        # A fresh run stopped by bad input leaves nothing behind; an interrupted one keeps
        # .work so that the rerun resumes.
        if bad_input and fresh and dist.rank == 0:
            shutil.rmtree(work, ignore_errors=True)

    def finish():
        if dist.rank != 0:
            return None
        entries = [json.loads((work / "shards" / f"{k:05d}.json").read_text()) for k in range(len(plan))]
        shards.atomic_write(out / "tokenizer.json", lambda f: f.write(tok_json.encode()))
        counts_ = {
            "documents": int(keep.sum()),
            "duplicates_dropped": int(len(keep) - keep.sum()),
            "sequences": sum(e["sequences"] for e in entries),
            "tokens": sum(e["token_count"] for e in entries),
            "document_tokens": sum(r["document_tokens"] for r in built.values()),
            **stats,
        }
        manifest = dict(
            seq_len=cfg.seq_len, shard_sequences=cfg.shard_sequences, token_dtype=dtype, counts=counts_,
            tokenizer={"file": "tokenizer.json", "source": tok_file, "sha256": tok_sha,
                       "vocab_size": vocab_size, "special_ids": special},
            seed=cfg.seed,
            options={k: getattr(cfg, k) for k in ("nsp", "short_seq_prob", "dedup", "text_field",
                                                  "unit_bytes", "max_line_chars")},
            inputs=[{"path": s.path, "kind": s.kind, "bytes": s.size} for s in sources],
            shards=entries, fingerprint=fingerprint,
        )
        shards.write_manifest(out, **manifest)
        shutil.rmtree(work)
        for partial in out.glob(".*.tmp*"):  # left by a killed run: never listed, now removed
            partial.unlink()
        return counts_
    totals = _step(dist, finish)
    seconds = time.time() - started
    if totals is not None:
        resumed = f", {n_resumed} of {len(units)} units resumed from an earlier run" if n_resumed else ""
        _log(dist, f"{out}: {totals['documents']} documents ({totals['duplicates_dropped']} duplicates dropped), "
                   f"{totals['sequences']} sequences of <= {cfg.seq_len} tokens in {len(plan)} shards, "
                   f"{sum(u['tokens'] for u in units) / seconds:,.0f} tokens/s, {seconds:.1f} s{resumed}")
    return json.loads((out / shards.MANIFEST).read_text())
