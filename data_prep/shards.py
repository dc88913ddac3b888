"""On-disk shard format: writer helpers and the memory-mapped reader `ShardDataset`.

A prepared directory holds

    manifest.json              counts, options, tokenizer hash, one entry per shard
    tokenizer.json             copy of the tokenizer the shards were written with
    shard_00000.tokens.npy     flat token ids of every sequence, [CLS] A [SEP] (B [SEP]) included
    shard_00000.index.npy      int32 [n, 4]: start in tokens, length, length of segment A
                               ([CLS] A [SEP]), next-sentence label (-1 without NSP)
    ...

Every shard holds `shard_sequences` sequences except the last, so sequence i lives in shard
i // shard_sequences: O(1) lookup with no global offset table. Nothing is padded on disk;
padding to seq_len happens in `get_batch`. Masking is not stored either: it is dynamic at load
time, so one prep serves any number of epochs.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from common.outputs import atomic_write, write_json

FORMAT = "earlybert-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_COLUMNS = ("start", "length", "len_a", "label")
# The index stores in-shard token offsets as int32.
MAX_SHARD_TOKENS = 2**31 - 1
# No BERT has more positions than 8192; past this a "sequence" is a typo (--seq-len 1000000000), or a damaged
# manifest that would have get_batch allocate terabytes.
MAX_SEQ_LEN = 1 << 16
# The fields of a manifest's shard entry that reading and verifying use, with their types.
SHARD_FIELDS = {
    "tokens": str,
    "index": str,
    "sequences": int,
    "tokens_bytes": int,
    "index_bytes": int,
    "tokens_sha256": str,
    "index_sha256": str,
}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def shard_names(shard_id: int) -> tuple[str, str]:
    return f"shard_{shard_id:05d}.tokens.npy", f"shard_{shard_id:05d}.index.npy"


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_npy(path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def write_manifest(directory, **fields) -> None:
    """Write DIR/manifest.json last: its presence marks a complete, verified-on-open directory."""
    write_json(Path(directory) / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, **fields})


def write_shard(directory, shard_id: int, tokens: np.ndarray, index: np.ndarray) -> dict:
    """Write one shard (tokens first, index last) and return its manifest entry."""
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(
            f"shard {shard_id} has {len(tokens)} tokens, more than the int32 index allows: lower --shard-sequences"
        )
    assert index.dtype == np.int32 and index.ndim == 2 and index.shape[1] == len(INDEX_COLUMNS)
    directory = Path(directory)
    tok_name, idx_name = shard_names(shard_id)
    save_npy(directory / tok_name, tokens)
    save_npy(directory / idx_name, index)
    return {
        "tokens": tok_name,
        "index": idx_name,
        "sequences": len(index),
        "token_count": len(tokens),
        "max_token_id": int(tokens.max()) if len(tokens) else -1,
        "tokens_bytes": (directory / tok_name).stat().st_size,
        "index_bytes": (directory / idx_name).stat().st_size,
        "tokens_sha256": sha256_file(directory / tok_name),
        "index_sha256": sha256_file(directory / idx_name),
    }


class ShardError(RuntimeError):
    """A prepared directory is missing, damaged, or was written by another version."""


class ShardDataset:
    """Random access to the sequences of a prepared directory, padded to seq_len.

    Shards are memory-mapped lazily on first access; nothing is loaded into memory. Safe to
    pickle (DataLoader workers): the maps are dropped and reopened in the new process.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        fix = f"re-run `earlybert prep ... --output {self.directory}`"
        if not path.is_file():
            raise ShardError(f"{path}: not found; {fix} (or point at a prepared directory)")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable ({e}); {fix}") from e
        m = self.manifest if isinstance(self.manifest, dict) else {}  # a list or a number: "format None"
        if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{path}: format {m.get('format')!r} version {m.get('format_version')!r}, "
                f"this code reads {FORMAT!r} version {FORMAT_VERSION}; {fix}"
            )
        try:
            self._read_manifest(m, path, fix)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            # A manifest edited by hand or written by something else: name the file, not a KeyError deep inside.
            raise ShardError(f"{path}: malformed ({type(e).__name__}: {e}); {fix}") from e
        self._maps = {}

    def _read_manifest(self, m: dict, path: Path, fix: str):
        self.seq_len = int(m["seq_len"])
        self.vocab_size = int(m["tokenizer"]["vocab_size"])
        self.has_nsp = bool(m["options"]["nsp"])
        self.special_ids = {k: int(v) for k, v in m["tokenizer"]["special_ids"].items()}
        if not 0 < self.seq_len <= MAX_SEQ_LEN:
            raise ShardError(f"{path}: seq_len {self.seq_len} outside [1, {MAX_SEQ_LEN}]; {fix}")
        if not all(0 <= i < self.vocab_size for i in self.special_ids.values()):
            raise ShardError(f"{path}: special_ids {self.special_ids} outside vocab_size {self.vocab_size}; {fix}")
        self.tokenizer_hash = m["tokenizer"]["sha256"]
        self.shard_sequences = int(m["shard_sequences"])
        # The largest token id in the shards (None in directories prepared before it was recorded): training
        # checks it against the model's vocabulary before its first step.
        self.max_token_id = None if m.get("max_token_id") is None else int(m["max_token_id"])
        if self.max_token_id is not None and self.max_token_id >= self.vocab_size:
            raise ShardError(f"{path}: max_token_id {self.max_token_id} >= vocab_size {self.vocab_size}; {fix}")
        self._dtype = token_dtype(self.vocab_size)
        self._shards = m["shards"]
        for k, s in enumerate(self._shards):
            wrong = [name for name, kind in SHARD_FIELDS.items() if not isinstance(s.get(name), kind)]
            if wrong:
                raise ShardError(f"{path}: shard {k}: {', '.join(wrong)} missing or of the wrong type; {fix}")
        counts = [s["sequences"] for s in self._shards]
        if (
            not counts
            or any(c != self.shard_sequences for c in counts[:-1])
            or not 0 < counts[-1] <= self.shard_sequences
        ):
            raise ShardError(
                f"{path}: shard sequence counts {counts[:5]}... do not match "
                f"shard_sequences={self.shard_sequences}; {fix}"
            )
        self._len = sum(counts)
        if self._len != m["counts"]["sequences"]:
            raise ShardError(f"{path}: shards hold {self._len} sequences, counts say {m['counts']['sequences']}; {fix}")
        for s in self._shards:
            self._check_file(s["tokens"], s["tokens_bytes"], None, fix)
            self._check_file(s["index"], s["index_bytes"], s["index_sha256"], fix)

    def _check_file(self, name, size, sha256, fix):
        f = self.directory / name
        if not f.is_file():
            raise ShardError(f"{f}: listed in {MANIFEST} but missing; {fix}")
        if f.stat().st_size != size:
            raise ShardError(f"{f}: {f.stat().st_size} bytes, {MANIFEST} says {size} (truncated or overwritten); {fix}")
        if sha256 is not None and sha256_file(f) != sha256:
            raise ShardError(f"{f}: checksum differs from {MANIFEST}; {fix}")

    def verify(self, full: bool = True) -> None:
        """Re-check every file; with full=True also hash the token files and check that every
        index row points inside its shard and every token id is inside the vocabulary."""
        fix = f"re-run `earlybert prep ... --output {self.directory}`"
        for k, s in enumerate(self._shards):
            self._check_file(s["tokens"], s["tokens_bytes"], s["tokens_sha256"] if full else None, fix)
            self._check_file(s["index"], s["index_bytes"], s["index_sha256"], fix)
            if not full:
                continue
            tokens, index = self._shard(k)
            start, length = index[:, 0].astype(np.int64), index[:, 1].astype(np.int64)
            if (start < 0).any() or (start + length > len(tokens)).any() or (length > self.seq_len).any():
                raise ShardError(f"{self.directory / s['index']}: rows point outside the shard; {fix}")
            if len(tokens) and int(tokens.max()) >= self.vocab_size:
                raise ShardError(f"{self.directory / s['tokens']}: token id >= vocab_size; {fix}")

    def _shard(self, k: int):
        if k not in self._maps:
            s = self._shards[k]
            self._maps[k] = tuple(self._load(s[name]) for name in ("tokens", "index"))
        return self._maps[k]

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.directory / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:  # the right size, but not an .npy file any more
            raise ShardError(
                f"{self.directory / name}: unreadable ({e}); re-run `earlybert prep ... --output {self.directory}`"
            ) from e

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def get_batch(self, indices) -> dict:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self._len or idx.max() >= self._len):
            raise IndexError(f"index out of range for {self._len} sequences")
        idx = np.where(idx < 0, idx + self._len, idx)
        n, L = len(idx), self.seq_len
        input_ids = np.full((n, L), self.special_ids["pad"], dtype=np.int64)
        token_type_ids = np.zeros((n, L), dtype=np.int64)
        attention_mask = np.zeros((n, L), dtype=np.int64)
        labels = np.empty(n, dtype=np.int64)
        shard_of = idx // self.shard_sequences
        pos = np.arange(L)
        for k in np.unique(shard_of):
            rows = np.nonzero(shard_of == k)[0]
            tokens, index = self._shard(int(k))
            meta = index[idx[rows] - k * self.shard_sequences].astype(np.int64)
            start, length, len_a = meta[:, 0:1], meta[:, 1:2], meta[:, 2:3]
            valid = pos < length
            # Clip so the padded tail of the last sequence never reads past the map.
            gather = np.minimum(start + pos, max(len(tokens) - 1, 0))
            input_ids[rows] = np.where(valid, tokens[gather], self.special_ids["pad"])
            attention_mask[rows] = valid
            token_type_ids[rows] = valid & (pos >= len_a)
            labels[rows] = meta[:, 3]
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "next_sentence_label": labels,
        }

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}  # a pickled np.memmap would copy the whole shard
        return state

    def __repr__(self):
        return (
            f"ShardDataset({str(self.directory)!r}, sequences={self._len}, seq_len={self.seq_len}, "
            f"shards={len(self._shards)}, nsp={self.has_nsp})"
        )
