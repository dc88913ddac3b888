"""`earlybert prep` end to end on real text (docstrings and docs gathered from this machine) with a
small WordPiece tokenizer trained here: round trip, determinism across workers and MPI ranks,
resume after a kill, and each kind of bad input."""

import bz2
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from data_prep import ShardDataset
from data_prep.cli import main as prep_main
from data_prep.local_corpus import gather_local_corpus
from data_prep.prep import PrepConfig, run_prep
from data_prep.readers import HARD_CAP_UNITS, Source, read_units
from data_prep.wordpiece import train_wordpiece

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Documents (lists of lines) of a ~300 kB real corpus, and the tokenizer trained on it."""
    d = tmp_path_factory.mktemp("prep_corpus")
    gather_local_corpus(d / "corpus.txt", 300_000)
    docs = [doc.split("\n") for doc in (d / "corpus.txt").read_text().split("\n\n") if doc]
    tok_path = d / "tokenizer.json"
    train_wordpiece([str(d / "corpus.txt")], tok_path, vocab_size=2000, lowercase=True)
    return {"dir": d, "text": d / "corpus.txt", "docs": docs, "tokenizer": tok_path}


@pytest.fixture(scope="session")
def mixed_inputs(corpus):
    """The corpus split over every input format, in this order, with cross-file duplicates:
    gzip text, zstd JSONL, Parquet, bz2 text (with repeats of the first part), plain text.
    Returns (paths, documents in input order)."""
    d, docs = corpus["dir"] / "mixed", corpus["docs"]
    d.mkdir()
    parts = np.array_split(np.arange(len(docs)), 4)
    group = [[docs[i] for i in p] for p in parts]
    text = lambda ds: "".join("\n".join(doc) + "\n\n" for doc in ds).encode()
    (d / "a.txt.gz").write_bytes(gzip.compress(text(group[0])))
    jsonl = "".join(json.dumps({"id": i, "text": "\n".join(doc)}) + "\n" for i, doc in enumerate(group[1]))
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    pq.write_table(pa.table({"text": ["\n".join(doc) for doc in group[2]]}), d / "c.parquet", row_group_size=7)
    repeats = group[0][:3]
    (d / "d.txt.bz2").write_bytes(bz2.compress(text(group[3][: len(group[3]) // 2] + repeats)))
    (d / "e.txt").write_bytes(text(group[3][len(group[3]) // 2 :]))
    paths = [str(d / n) for n in ("a.txt.gz", "b.jsonl.zst", "c.parquet", "d.txt.bz2", "e.txt")]
    ordered = group[0] + group[1] + group[2] + group[3][: len(group[3]) // 2] + repeats + group[3][len(group[3]) // 2 :]
    return paths, ordered


def _prep(inputs, out, tokenizer, **kw):
    options = dict(seq_len=64, workers=1, shard_sequences=300, unit_bytes=16 * 1024, progress=False)
    options.update(kw)
    return run_prep(PrepConfig(inputs=[str(p) for p in inputs], output=str(out), tokenizer=str(tokenizer), **options))


def _files(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def _expected_tokens(docs, tokenizer_path):
    tok = Tokenizer.from_file(str(tokenizer_path))
    seen, ids = set(), []
    for doc in docs:
        key = "\n".join(doc)
        if key in seen:
            continue
        seen.add(key)
        ids += [t for e in tok.encode_batch(doc, add_special_tokens=False) for t in e.ids]
    return np.array(ids), len(seen)


@pytest.fixture(scope="module")
def nsp_reference(tmp_path_factory, corpus, mixed_inputs):
    """NSP shards of the mixed inputs written by one process with one worker."""
    out = tmp_path_factory.mktemp("nsp") / "w1"
    _prep(mixed_inputs[0], out, corpus["tokenizer"])
    return out


def test_round_trip_packed_all_formats(tmp_path, corpus, mixed_inputs):
    paths, docs = mixed_inputs
    manifest = _prep(paths, tmp_path, corpus["tokenizer"], nsp=False, seq_len=48)
    ds = ShardDataset(tmp_path)
    ds.verify(full=True)
    batch = ds.get_batch(np.arange(len(ds)))
    special = ds.special_ids
    got = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        assert ids[0] == special["cls"] and ids[n - 1] == special["sep"] and n <= 48
        got += [t for t in ids[1 : n - 1] if t != special["sep"]]
    expected, n_docs = _expected_tokens(docs, corpus["tokenizer"])
    np.testing.assert_array_equal(np.array(got), expected)
    assert (batch["token_type_ids"] == 0).all() and (batch["next_sentence_label"] == -1).all()
    counts = manifest["counts"]
    assert counts["documents"] == n_docs and counts["duplicates_dropped"] == 3
    assert counts["document_tokens"] == len(expected) and counts["sequences"] == len(ds)
    sizes = [s["sequences"] for s in manifest["shards"]]
    assert len(sizes) > 1 and set(sizes[:-1]) == {300} and 0 < sizes[-1] <= 300
    assert (
        not ds.has_nsp
        and ds.seq_len == 48
        and [s["kind"] for s in manifest["inputs"]] == ["text", "jsonl", "parquet", "text", "text"]
    )
    assert not (tmp_path / ".work").exists()


def test_saved_datasets_directory(tmp_path, corpus):
    import datasets

    docs = corpus["docs"][:40]
    texts = ["\n".join(doc) for doc in docs]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts[:30], "n": list(range(30))}),
            "validation": datasets.Dataset.from_dict({"text": texts[30:], "n": list(range(10))}),
        }
    ).save_to_disk(tmp_path / "dd")
    _prep([tmp_path / "dd"], tmp_path / "out", corpus["tokenizer"], nsp=False)
    batch = ShardDataset(tmp_path / "out").get_batch(np.arange(len(ShardDataset(tmp_path / "out"))))
    sep = ShardDataset(tmp_path / "out").special_ids["sep"]
    got = [t for ids, m in zip(batch["input_ids"], batch["attention_mask"]) for t in ids[1 : m.sum() - 1] if t != sep]
    np.testing.assert_array_equal(got, _expected_tokens(docs, corpus["tokenizer"])[0])  # splits in name order


def test_nsp_pairs_are_corpus_spans(corpus, mixed_inputs, nsp_reference):
    ds = ShardDataset(nsp_reference)
    assert ds.has_nsp
    expected, _ = _expected_tokens(mixed_inputs[1], corpus["tokenizer"])
    stream = expected.astype("<u4").tobytes()

    def is_span(ids):
        pos = stream.find(ids.astype("<u4").tobytes())
        while pos >= 0 and pos % 4:
            pos = stream.find(ids.astype("<u4").tobytes(), pos + 1)
        return pos >= 0

    batch = ds.get_batch(np.arange(len(ds)))
    labels = batch["next_sentence_label"]
    assert set(np.unique(labels)) == {0, 1} and 0.4 < labels.mean() < 0.75
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() <= 64 and (lengths < 40).mean() > 0.02  # short_seq_prob yields short targets
    for row in range(0, len(ds), max(1, len(ds) // 150)):
        ids, types, n = batch["input_ids"][row], batch["token_type_ids"][row], lengths[row]
        len_a = int((types[:n] == 0).sum())
        assert ids[0] == ds.special_ids["cls"] and ids[len_a - 1] == ds.special_ids["sep"] == ids[n - 1]
        a, b = ids[1 : len_a - 1], ids[len_a : n - 1]
        assert len(a) and len(b) and is_span(a) and is_span(b)
        if labels[row] == 0 and len(a) + len(b) < 61:  # untruncated true continuation
            assert is_span(np.concatenate([a, b]))


def test_two_workers_same_output(tmp_path, corpus, mixed_inputs, nsp_reference):
    _prep(mixed_inputs[0], tmp_path / "w2", corpus["tokenizer"], workers=2)
    assert _files(tmp_path / "w2") == _files(nsp_reference)


def _mpirun(args, timeout=120):
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", PYTHON, "-m", "data_prep", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed")
def test_two_mpi_ranks_same_output(tmp_path, corpus, mixed_inputs, nsp_reference):
    # Five files over two ranks: each rank reads its own files.
    common = [
        "--tokenizer",
        str(corpus["tokenizer"]),
        "--seq-len",
        "64",
        "--shard-sequences",
        "300",
        "--unit-kb",
        "16",
        "--workers",
        "1",
    ]
    r = _mpirun(["--input", *mixed_inputs[0], "--output", str(tmp_path / "mpi"), *common])
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path / "mpi") == _files(nsp_reference)
    # One file over two ranks: both read it, each takes every other unit.
    _prep([corpus["text"]], tmp_path / "single", corpus["tokenizer"])
    r = _mpirun(["--input", str(corpus["text"]), "--output", str(tmp_path / "mpi1"), *common])
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path / "mpi1") == _files(tmp_path / "single")


def test_resume_after_kill(tmp_path, corpus, capsys):
    text = tmp_path / "big.txt"
    text.write_bytes(corpus["text"].read_bytes() * 4)  # repeats are dropped as duplicates
    args = [
        "--input",
        str(text),
        "--tokenizer",
        str(corpus["tokenizer"]),
        "--seq-len",
        "64",
        "--shard-sequences",
        "500",
        "--unit-kb",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [PYTHON, "-m", "data_prep", *args, "--output", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while len(list(out.glob(".work/units/*.npz"))) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prep finished before it could be killed"
    assert not (out / "manifest.json").exists()
    (out / ".shard_00000.tokens.npy.tmp1").write_bytes(b"partial")  # as a kill during a write leaves
    done = len(list(out.glob(".work/units/*.npz")))

    assert prep_main([*args, "--output", str(out)]) == 0
    resumed = int(capsys.readouterr().err.split(" units resumed")[0].rsplit(", ", 1)[1].split(" of ")[0])
    assert resumed >= done  # the killed run's units were reused, not redone
    manifest = json.loads((out / "manifest.json").read_text())
    assert not list(out.glob(".*")), "temporary files and .work must be gone"
    assert manifest["counts"]["duplicates_dropped"] == 3 * manifest["counts"]["documents"]
    assert prep_main([*args, "--output", str(tmp_path / "fresh")]) == 0
    assert _files(out) == _files(tmp_path / "fresh")
    ShardDataset(out).verify(full=True)


def test_bad_bytes_empty_documents_and_enormous_lines(tmp_path, corpus, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(
        "Caf\u00e9 cr\u00e8me is served here.\n\nA second document.\n".encode("latin-1") + b"\xff\xfe end\n"
    )
    empty = tmp_path / "records.jsonl"
    empty.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  \n \t", "one real document", ""]) + "\n")
    huge = tmp_path / "huge.txt"
    line = " ".join(["documentation"] * 40_000)  # ~560 kB, one line, no blank line
    huge.write_text(line + "\n")

    units = list(read_units(0, Source(str(huge), "text", huge.stat().st_size, 0), 16 * 1024))
    assert max(len(u.payload) for u in units) <= HARD_CAP_UNITS * 16 * 1024
    assert b"".join(u.payload for u in units) == huge.read_bytes()

    manifest = _prep([bad, empty, huge], tmp_path / "out", corpus["tokenizer"], nsp=False, max_line_chars=5000)
    counts = manifest["counts"]
    assert counts["replaced_bytes"] == 4  # é and è as latin-1 bytes, then \xff\xfe
    assert counts["empty_documents"] == 3
    assert counts["split_lines"] >= len(units) - 1 > 0
    err = capsys.readouterr().err
    assert f"{bad}: 4 non-UTF-8 bytes replaced" in err
    assert f"{empty}: 3 empty documents skipped" in err
    assert f"{huge}:" in err and "over-long lines split" in err
    ShardDataset(tmp_path / "out").verify(full=True)


@pytest.mark.parametrize(
    "case", ["missing", "broken_link", "corrupt_gzip", "no_match", "bad_json", "empty", "zero_bytes"]
)
def test_bad_input_stops_with_the_file_name(tmp_path, corpus, capsys, case):
    good = tmp_path / "good.txt"
    good.write_text("A perfectly good document.\n\nAnd another one.\n")
    bad = tmp_path / {"corrupt_gzip": "x.txt.gz", "bad_json": "x.jsonl", "no_match": "none*.txt"}.get(case, "x.txt")
    if case == "broken_link":
        bad.symlink_to(tmp_path / "gone.txt")
    elif case == "corrupt_gzip":
        data = gzip.compress("".join(f"line {i} of a document\n" for i in range(5000)).encode())
        bad.write_bytes(data[: len(data) // 2])
    elif case == "bad_json":
        bad.write_text('{"text": "fine"}\n{"text": broken\n')
    elif case == "empty":
        bad.write_text("\n   \n\t\n")
    elif case == "zero_bytes":
        bad.write_bytes(b"")
    out = tmp_path / "out"
    inputs = [str(bad)] if case in ("empty", "zero_bytes") else [str(good), str(bad)]
    code = prep_main(
        [
            "--input",
            *inputs,
            "--output",
            str(out),
            "--tokenizer",
            str(corpus["tokenizer"]),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and str(bad) + (":2" if case == "bad_json" else "") in err, err
    assert not out.exists() or not any(out.iterdir()), "nothing may be left in the output"
    if case in ("empty", "zero_bytes"):
        assert "no documents" in err and "every input is empty or blank" in err


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, corpus):
    """Under srun, mpirun or nohup: a line at the start and end of every pass and, with
    EARLYBERT_PROGRESS_SECONDS=0, one at every step in between; --no-progress: only the summary."""
    args = [
        PYTHON,
        "-m",
        "data_prep",
        "--input",
        str(corpus["text"]),
        "--tokenizer",
        str(corpus["tokenizer"]),
        "--seq-len",
        "64",
        "--shard-sequences",
        "300",
        "--unit-kb",
        "64",
        "--workers",
        "1",
    ]
    env = dict(os.environ, EARLYBERT_PROGRESS_SECONDS="0")
    run = lambda *extra: subprocess.run([*args, *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    r = run("--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    *progress, summary = r.stderr.splitlines()
    by_pass = {}
    for line in progress:
        by_pass.setdefault(line.split(":")[0], []).append(line)
    assert list(by_pass) == ["prep encode", "prep dedup", "prep sequences", "prep shards"], progress
    assert progress == [line for lines in by_pass.values() for line in lines], "passes must not interleave"
    for start, *steps, end in by_pass.values():
        assert start.endswith(" to do") and " done in " in end and len(steps) >= 2, (start, end)
        assert all("%), " in step and "/s, " in step and " left" in step for step in steps), steps
    assert "docs=" in by_pass["prep encode"][-1]
    assert summary.startswith(f"{tmp_path / 'out'}: ") and "shards" in summary

    r = run("--output", str(tmp_path / "quiet"), "--no-progress")
    assert r.returncode == 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"{tmp_path / 'quiet'}: ")


def test_progress_lines_at_most_every_interval(monkeypatch, capsys):
    from common.progress import INTERVAL_ENV, progress_bar

    monkeypatch.setenv(INTERVAL_ENV, "3600")
    with progress_bar("count", 1000, "items") as bar:  # capsys: stderr is not a terminal
        for _ in range(1000):
            bar.update(1)
    start, end = capsys.readouterr().err.splitlines()  # nothing in between
    assert start == "count: 1,000 items to do" and end.startswith("count: 1,000 items done in 00:00, ")


def test_tokenizer_training_reports_progress_and_time(tmp_path, corpus):
    env = dict(os.environ, EARLYBERT_PROGRESS_SECONDS="0")
    out = tmp_path / "tok.json"
    r = subprocess.run(
        [
            PYTHON,
            "-m",
            "data_prep",
            "tokenizer",
            "--input",
            str(corpus["text"]),
            "--output",
            str(out),
            "--vocab-size",
            "500",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"{out}: training a WordPiece vocabulary of 500 tokens on {corpus['text']}"
    reading = [line for line in lines if line.startswith("tokenizer: reading the corpus: ")]
    assert reading == lines[1:-1] and len(reading) >= 3 and " done in " in reading[-1], lines
    assert lines[-1].startswith(f"{out}: WordPiece vocabulary of 500 tokens in ") and lines[-1].endswith(" s")


def test_output_written_with_another_tokenizer_is_left_alone(tmp_path, corpus, capsys):
    from pipeline.cli import main as earlybert  # the project's `earlybert` console script

    out = tmp_path / "out"
    args = ["prep", "--input", str(corpus["text"]), "--output", str(out), "--seq-len", "64", "--workers", "1"]
    assert earlybert([*args, "--tokenizer", str(corpus["tokenizer"])]) == 0
    before = _files(out)
    assert earlybert([*args, "--tokenizer", str(corpus["tokenizer"])]) == 0  # complete: nothing to do
    other = tmp_path / "other.json"
    train_wordpiece([str(corpus["text"])], other, vocab_size=1500)
    assert earlybert([*args, "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert (
        f"was written with another tokenizer ({corpus['tokenizer']}, sha256" in err and "internal error" not in err
    ), err
    assert earlybert([*args, "--tokenizer", str(corpus["tokenizer"]), "--seq-len", "128"]) == 2
    assert "different seq_len" in capsys.readouterr().err
    assert _files(out) == before
    ShardDataset(out).verify(full=True)


def test_local_corpus_from_a_documentation_tree(tmp_path, capsys):
    """`local-corpus --from DIR` (how the kernel-docs benchmark corpus is gathered): reST, Markdown
    and text files, gzip-compressed or not, one document per file in walk order, markup dropped."""
    docs = tmp_path / "Documentation"
    (docs / "admin").mkdir(parents=True)
    page = (
        "Memory management\n=================\n\n.. note:: not prose\n\n"
        "The kernel keeps free pages on per-zone lists and\nrefills them from the buddy allocator.\n\n"
        "+-----+-----+\n| a   | b   |\n+-----+-----+\n"
    )
    (docs / "admin" / "mm.rst.gz").write_bytes(gzip.compress(page.encode()))
    (docs / "intro.txt").write_text("Linux is a clone of the operating system Unix, written from scratch.\n")
    (docs / "conf.py").write_text('"""A docstring the documentation mode must not read."""\n')
    (docs / "broken.md.gz").write_bytes(gzip.compress(b"Truncated file that never ends")[:-12])
    out = tmp_path / "corpus.txt"
    assert prep_main(["local-corpus", "--output", str(out), "--from", str(docs)]) == 0
    assert out.read_text() == (
        "Linux is a clone of the operating system Unix, written from scratch.\n\n"
        "The kernel keeps free pages on per-zone lists and refills them from the buddy allocator.\n\n"
    )
    assert prep_main(["local-corpus", "--output", str(tmp_path / "x.txt"), "--from", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: not a directory" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
