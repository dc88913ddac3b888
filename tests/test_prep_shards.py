"""Shard format: writer + ShardDataset reader, checked against sequences built in the test."""

import pickle

import numpy as np
import pytest

from data_prep import ShardDataset, ShardError
from data_prep.shards import token_dtype, write_manifest, write_shard

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def _write(directory, sequences, seq_len, per_shard, vocab_size=1000, nsp=True):
    """sequences: list of (token list, len_a, label). Returns the manifest's shard entries."""
    entries = []
    for k in range(0, len(sequences), per_shard):
        chunk = sequences[k : k + per_shard]
        lengths = np.array([len(t) for t, _, _ in chunk])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        index = np.stack([starts, lengths, [a for _, a, _ in chunk], [label for _, _, label in chunk]], 1).astype(
            np.int32
        )
        tokens = np.concatenate([t for t, _, _ in chunk]).astype(token_dtype(vocab_size))
        entries.append(write_shard(directory, k // per_shard, tokens, index))
    write_manifest(
        directory,
        seq_len=seq_len,
        shard_sequences=per_shard,
        shards=entries,
        counts={"sequences": len(sequences)},
        options={"nsp": nsp},
        tokenizer={"vocab_size": vocab_size, "special_ids": SPECIAL, "sha256": "x" * 64},
    )
    return entries


def _random_sequences(n, seq_len, vocab_size, nsp, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, seq_len + 1))
        tokens = rng.integers(5, vocab_size, length)
        len_a = int(rng.integers(2, length - 1)) if nsp else length
        tokens[0], tokens[len_a - 1], tokens[-1] = SPECIAL["cls"], SPECIAL["sep"], SPECIAL["sep"]
        out.append((tokens, len_a, int(rng.integers(0, 2)) if nsp else -1))
    return out


@pytest.mark.parametrize("vocab_size,nsp", [(1000, True), (70000, False)])
def test_round_trip(tmp_path, vocab_size, nsp):
    seq_len = 16
    seqs = _random_sequences(23, seq_len, vocab_size, nsp)
    entries = _write(tmp_path, seqs, seq_len, per_shard=5, vocab_size=vocab_size, nsp=nsp)
    assert [e["sequences"] for e in entries] == [5, 5, 5, 5, 3]
    ds = ShardDataset(tmp_path)
    assert len(ds) == 23 and ds.seq_len == seq_len and ds.has_nsp == nsp and ds.vocab_size == vocab_size
    assert ds.special_ids == SPECIAL and ds.tokenizer_hash == "x" * 64
    assert np.load(tmp_path / entries[0]["tokens"], mmap_mode="r").dtype == token_dtype(vocab_size)
    ds.verify(full=True)

    order = np.random.default_rng(1).permutation(23)
    batch = ds.get_batch(order)
    assert all(v.dtype == np.int64 for v in batch.values())
    assert batch["input_ids"].shape == (23, seq_len) and batch["next_sentence_label"].shape == (23,)
    for row, i in enumerate(order):
        tokens, len_a, label = seqs[i]
        n = len(tokens)
        item = ds[int(i)]
        for got in (item, {k: v[row] for k, v in batch.items()}):
            np.testing.assert_array_equal(got["input_ids"][:n], tokens)
            assert (got["input_ids"][n:] == SPECIAL["pad"]).all()
            np.testing.assert_array_equal(got["attention_mask"], np.arange(seq_len) < n)
            np.testing.assert_array_equal(
                got["token_type_ids"], (np.arange(seq_len) >= len_a) & (np.arange(seq_len) < n)
            )
            assert int(got["next_sentence_label"]) == label
    np.testing.assert_array_equal(ds[-1]["input_ids"], ds[22]["input_ids"])
    with pytest.raises(IndexError):
        ds.get_batch([23])

    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.get_batch(order)["input_ids"], batch["input_ids"])


def test_damage_is_reported_with_the_file_name(tmp_path):
    entries = _write(tmp_path, _random_sequences(10, 12, 1000, True), 12, per_shard=4)
    ShardDataset(tmp_path)

    tok = tmp_path / entries[1]["tokens"]
    data = bytearray(tok.read_bytes())
    data[-1] ^= 0xFF  # same size: only the full check can see it
    tok.write_bytes(bytes(data))
    ShardDataset(tmp_path)
    with pytest.raises(ShardError, match=entries[1]["tokens"]):
        ShardDataset(tmp_path).verify(full=True)

    idx = tmp_path / entries[0]["index"]
    raw = bytearray(idx.read_bytes())
    raw[-1] ^= 0x01
    idx.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{entries[0]['index']}: checksum"):
        ShardDataset(tmp_path)
    raw[-1] ^= 0x01
    idx.write_bytes(bytes(raw))

    (tmp_path / entries[2]["tokens"]).write_bytes(b"short")
    with pytest.raises(ShardError, match=entries[2]["tokens"]):
        ShardDataset(tmp_path)
    (tmp_path / entries[2]["tokens"]).unlink()
    with pytest.raises(ShardError, match="missing"):
        ShardDataset(tmp_path)


def test_missing_and_foreign_manifest(tmp_path):
    with pytest.raises(ShardError, match="manifest.json: not found"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "earlybert-shards", "format_version": 99}')
    with pytest.raises(ShardError, match="version 99"):
        ShardDataset(tmp_path)
