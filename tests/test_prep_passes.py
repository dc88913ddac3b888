"""The passes of `earlybert prep` (data_prep/prep.py) called one at a time on a tiny input."""

import os
from pathlib import Path

import numpy as np
import pytest

from common import outputs
from data_prep import ShardDataset, prep, shards
from data_prep.wordpiece import train_wordpiece

ANIMALS = ["otter", "heron", "badger", "falcon", "beaver", "lynx"]
# Six documents of ~1.2 kB: with 1 kB units every document is a unit of its own.
DOCS = [
    [f"the {animal} number {line} walks {line % 7} miles to the river and back." for line in range(24)]
    for animal in ANIMALS
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    _write_docs(d / "corpus.txt", DOCS)
    train_wordpiece([str(d / "corpus.txt")], d / "tokenizer.json", vocab_size=300, min_frequency=1)
    return d / "tokenizer.json"


def _write_docs(path: Path, docs) -> str:
    path.write_text("".join("\n".join(doc) + "\n\n" for doc in docs))
    return str(path)


def _open_run(tmp_path, inputs, tokenizer, **options) -> prep.PrepRun:
    cfg = dict(seq_len=16, workers=1, shard_sequences=4, unit_bytes=1024, progress=False) | options
    return prep.open_run(prep.PrepConfig(inputs=inputs, output=str(tmp_path / "out"), tokenizer=str(tokenizer), **cfg))


def test_encode_pass_reads_back_the_units_a_killed_run_finished(tmp_path, tokenizer):
    files = [_write_docs(tmp_path / "a.txt", DOCS[:4]), _write_docs(tmp_path / "b.txt", DOCS[4:])]
    run = _open_run(tmp_path, files, tokenizer, workers=2)
    with prep.open_work_dir(run), prep.start_workers(run) as workers:
        first = prep.encode_pass(run, workers)
        written = {p.stem: p.stat().st_mtime_ns for p in run.work.root.glob("units/*.npz")}
        redo = first[2]["key"]
        run.work.unit(redo).unlink()  # as if the killed run had not finished this unit
        again = prep.encode_pass(run, workers)
    assert [u["key"] for u in first] == sorted(written) and len(first) == 6
    assert [u["resumed"] for u in again] == [u["key"] != redo for u in first]
    assert [{**u, "resumed": False} for u in again] == first
    assert {k: run.work.unit(k).stat().st_mtime_ns for k in written if k != redo} == {
        k: t for k, t in written.items() if k != redo
    }


@pytest.mark.parametrize("dedup", [True, False])
def test_dedup_keeps_the_first_occurrence_in_global_order(tmp_path, tokenizer, dedup):
    a, b, c = DOCS[:3]
    files = [_write_docs(tmp_path / "1.txt", [a, b, a]), _write_docs(tmp_path / "2.txt", [c, b])]
    run = _open_run(tmp_path, files, tokenizer, dedup=dedup)
    with prep.open_work_dir(run), prep.start_workers(run) as workers:
        units = prep.encode_pass(run, workers)
        keep = prep.dedup_pass(run, units)
    assert [u["documents"] for u in units] == [1] * 5  # the order crosses units and files
    assert keep.tolist() == ([True, True, False, True, False] if dedup else [True] * 5)
    np.testing.assert_array_equal(np.load(run.work.keep), keep)


def test_shard_plan_cuts_exactly_shard_sequences():
    units = [{"key": key} for key in "abcde"]
    counts = [5, 0, 7, 3, 9]
    for n_units, sizes in [(5, [4] * 6), (4, [4, 4, 4, 3])]:
        plan = prep.shard_plan(units[:n_units], counts[:n_units], 4)
        assert [sum(hi - lo for _, lo, hi in shard) for shard in plan] == sizes
        in_shards = [(key, i) for shard in plan for key, lo, hi in shard for i in range(lo, hi)]
        assert in_shards == [(u["key"], i) for u, n in zip(units[:n_units], counts) for i in range(n)]


def test_sequence_and_shard_passes_fill_every_shard_but_the_last(tmp_path, tokenizer):
    run = _open_run(tmp_path, [_write_docs(tmp_path / "a.txt", DOCS)], tokenizer, shard_sequences=7)
    with prep.open_work_dir(run), prep.start_workers(run) as workers:
        units = prep.encode_pass(run, workers)
        keep = np.ones(sum(u["documents"] for u in units), dtype=bool)
        keep[1] = False
        built = prep.sequence_pass(run, workers, units, keep)
        plan = prep.shard_plan(units, [built[u["key"]]["sequences"] for u in units], 7)
        prep.shard_pass(run, workers, plan)
    assert built[units[1]["key"]] == {"key": units[1]["key"], "sequences": 0, "document_tokens": 0}
    total = sum(r["sequences"] for r in built.values())
    sizes = [len(np.load(run.out / shards.shard_names(k)[1])) for k in range(len(plan))]
    assert total > 14 and sizes == [7] * (total // 7) + ([total % 7] if total % 7 else [])


def _shards_before_the_manifest(run: prep.PrepRun, n_shards: int):
    """What pass 3 leaves: shard files in OUT and their entries in .work."""
    for k in range(n_shards):
        index = np.array([[0, 3, 3, -1]], np.int32)
        entry = shards.write_shard(run.out, k, np.array([2, 7, 3], np.uint16), index)
        shards.write_json(run.work.shard_entry(k), entry)


def test_manifest_is_written_last_and_atomically(tmp_path, tokenizer, monkeypatch):
    run = _open_run(tmp_path, [_write_docs(tmp_path / "a.txt", DOCS[:2])], tokenizer, shard_sequences=1)
    with prep.open_work_dir(run):
        _shards_before_the_manifest(run, 2)
    (run.out / ".shard_00000.tokens.npy.tmp1").write_bytes(b"partial")  # as a killed run leaves
    shard_files = [name for k in range(2) for name in shards.shard_names(k)]
    renamed, failures = [], [OSError("disk full")]  # the first manifest write fails
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == shards.MANIFEST:
            assert all((run.out / name).is_file() for name in [*shard_files, "tokenizer.json"])
            if failures:
                raise failures.pop()
        renamed.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    args = (run, 2, np.array([True, False, True]), {"x": {"document_tokens": 6}}, {"input_documents": 3})
    with pytest.raises(OSError, match="disk full"):
        prep.manifest_pass(*args)
    assert not (run.out / shards.MANIFEST).exists() and run.work.root.is_dir()  # a rerun resumes
    assert not list(run.out.glob(".manifest*"))

    counts = prep.manifest_pass(*args)
    assert renamed[-1] == (outputs.temporary_file(run.out / shards.MANIFEST).name, shards.MANIFEST)
    assert [dst for _, dst in renamed] == ["tokenizer.json", "tokenizer.json", shards.MANIFEST]
    assert counts == {
        "documents": 2,
        "duplicates_dropped": 1,
        "sequences": 2,
        "tokens": 6,
        "document_tokens": 6,
        "input_documents": 3,
    }
    assert sorted(p.name for p in run.out.iterdir()) == sorted([*shard_files, "tokenizer.json", shards.MANIFEST])
    ShardDataset(run.out).verify(full=True)
