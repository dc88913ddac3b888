"""Generated hostile inputs (Hypothesis) for what `earlybert prep` reads: corpora in every format (random bytes,
zero-byte files, invalid UTF-8, NUL bytes, JSON values of every type, truncated gzip/bz2/zstd streams, damaged
Parquet and `datasets` directories), tokenizer files, and prepared shard directories.

The property, for every generated case: it works, or it stops with exit 2 and a message naming the file; never a
traceback, never another exit status, never a half-written file under a final name. Examples are derandomized
(the same ones on every run) and bounded so that the file runs in well under a minute."""

import bz2
import contextlib
import copy
import gzip
import io
import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import ShardDataset, ShardError, prep
from data_prep.cli import main as prep_main
from data_prep.readers import InputError
from data_prep.wordpiece import train_wordpiece
from faults_table import tried

WORDS = "the kernel scheduler picks a task from its run queue and the allocator frees pages".split()


def bounded(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("properties")
    text = "\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))) * 20
    (d / "corpus.txt").write_text(text)
    train_wordpiece([str(d / "corpus.txt")], d / "tok.json", vocab_size=200, min_frequency=1)
    return d / "tok.json"


def prep_outcome(inputs: list[Path], tokenizer: Path, out: Path, *more) -> tuple[int, str]:
    """`earlybert prep` in this process; asserts what holds for every input: exit 0 with a directory that reads back
    and verifies, or exit 2 naming one of the inputs with nothing under a final name; no traceback."""
    err = io.StringIO()
    argv = ["--input", *map(str, inputs), "--output", str(out), "--tokenizer", str(tokenizer), "--no-progress"]
    with contextlib.redirect_stderr(err):
        code = prep_main([*argv, "--workers", "1", "--unit-kb", "4", *more])
    err = err.getvalue()
    assert "Traceback" not in err and code in (0, 2), err
    if code == 0:
        ShardDataset(out).verify(full=True)
    else:
        assert any(str(p) in err for p in inputs), err
        assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")], err
    return code, err


# ---- corpora ---------------------------------------------------------------------------------------------------
text_bytes = st.one_of(
    st.binary(max_size=3000),  # random bytes, zero-byte files, invalid UTF-8
    st.lists(st.sampled_from([*WORDS, " ", "\n", "\n\n", "\x00", "é", "\ufffd", "\t", "{"]), max_size=400).map(
        lambda parts: "".join(parts).encode()
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
jsonl_lines = st.one_of(
    st.builds(lambda v: json.dumps({"text": v}), json_values),  # every type under "text"
    st.builds(lambda words: json.dumps({"text": " ".join(words)}), st.lists(st.sampled_from(WORDS), max_size=30)),
    st.builds(json.dumps, json_values),  # no "text" field, or not an object
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),  # not JSON
    st.just(""),
)
jsonl_bytes = st.lists(jsonl_lines, max_size=12).map(lambda lines: "\n".join(lines).encode())
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".zst": zstandard.ZstdCompressor().compress}


@st.composite
def corpus_files(draw):
    """(file name, bytes): text or JSONL, plain or compressed, the compressed stream whole or cut anywhere."""
    kind = draw(st.sampled_from([".txt", ".jsonl"]))
    data = draw(text_bytes if kind == ".txt" else jsonl_bytes)
    suffix = draw(st.sampled_from(list(COMPRESS)))
    packed = COMPRESS[suffix](data)
    if suffix and draw(st.booleans()):
        packed = packed[: draw(st.integers(0, max(len(packed) - 1, 0)))]
    return f"corpus{kind}{suffix}", packed


@tried("prep_generated_corpus")
@bounded(40)
@given(files=st.lists(corpus_files(), min_size=1, max_size=3))
def test_any_corpus_is_prepared_or_refused_with_its_name(tmp_path, tokenizer, files):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        paths = []
        for i, (name, data) in enumerate(files):
            paths.append(Path(d) / f"{i}-{name}")
            paths[-1].write_bytes(data)
        prep_outcome(paths, tokenizer, Path(d) / "out")


parquet_columns = st.one_of(
    st.lists(st.one_of(st.none(), st.text(max_size=80), st.sampled_from(WORDS)), max_size=20).map(pa.array),
    st.lists(st.integers(-5, 5), max_size=5).map(pa.array),  # a column that is not text
)


@tried("prep_generated_parquet")
@bounded(15)
@given(column=parquet_columns, field=st.sampled_from(["text", "body"]), cut=st.none() | st.integers(0, 400))
def test_any_parquet_file_is_prepared_or_refused_with_its_name(tmp_path, tokenizer, column, field, cut):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = Path(d) / "c.parquet"
        pq.write_table(pa.table({field: column}), path)
        if cut is not None:
            path.write_bytes(path.read_bytes()[:cut])
        prep_outcome([path], tokenizer, Path(d) / "out")


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    import datasets

    path = tmp_path_factory.mktemp("dataset") / "ds"
    datasets.Dataset.from_dict({"text": [" ".join(WORDS[i:]) for i in range(len(WORDS))]}).save_to_disk(path)
    return path


@tried("prep_generated_dataset_dir")
@bounded(12)
@given(data=st.data())
def test_a_damaged_datasets_directory_is_prepared_or_refused_with_its_name(tmp_path, tokenizer, saved_dataset, data):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        ds = Path(d) / "ds"
        shutil.copytree(saved_dataset, ds)
        victim = data.draw(st.sampled_from(sorted(p.name for p in ds.iterdir())))
        content = (ds / victim).read_bytes()
        damage = data.draw(st.sampled_from(["truncate", "random", "delete", "json"]))
        if damage == "delete":
            (ds / victim).unlink()
        else:
            new = {
                "truncate": content[: data.draw(st.integers(0, len(content)))],
                "random": data.draw(st.binary(max_size=2000)),
                "json": json.dumps(data.draw(json_values)).encode(),
            }[damage]
            (ds / victim).write_bytes(new)
        prep_outcome([ds], tokenizer, Path(d) / "out")


# ---- tokenizer files -------------------------------------------------------------------------------------------
def _paths(tree, prefix=()):
    """Every key path of a JSON tree (dicts and lists)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _mutate(tree, path, value):
    """A copy of tree with the element at path replaced by value (deleted when value is ...)."""
    tree = copy.deepcopy(tree)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return tree


@tried("prep_generated_tokenizer")
@bounded(40)
@given(data=st.data())
def test_any_tokenizer_file_is_loaded_or_refused_with_its_name(tmp_path, tokenizer, data):
    valid = json.loads(tokenizer.read_text())
    shallow = [p for p in _paths(valid) if len(p) <= 3]
    how = data.draw(st.sampled_from(["bytes", "truncate", "field"]))
    if how == "bytes":
        content = data.draw(st.binary(max_size=500))
    elif how == "truncate":
        text = tokenizer.read_bytes()
        content = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        path = data.draw(st.sampled_from(shallow))
        content = json.dumps(_mutate(valid, path, data.draw(st.just(...) | json_values))).encode()
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        file = Path(d) / "tokenizer.json"
        file.write_bytes(content)
        try:
            prep.load_tokenizer(str(file))
        except InputError as e:
            assert str(file) in str(e)


# ---- prepared shard directories --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    (d / "c.txt").write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 5)
    options = ["--seq-len", "16", "--shard-sequences", "40", "--no-dedup"]
    code, err = prep_outcome([d / "c.txt"], tokenizer, d / "out", *options)
    assert code == 0 and len(json.loads((d / "out" / "manifest.json").read_text())["shards"]) > 2, err
    return d / "out"


@tried("shards_generated_damage")
@bounded(40)
@given(data=st.data())
def test_any_damaged_shard_directory_reads_back_or_is_refused_with_its_name(tmp_path, prepared, data):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        out = Path(d) / "out"
        shutil.copytree(prepared, out)
        manifest = json.loads((out / "manifest.json").read_text())
        if data.draw(st.booleans()):
            path = data.draw(st.sampled_from(list(_paths(manifest))))
            value = data.draw(st.just(...) | json_values | st.integers(-(2**70), 2**70))
            (out / "manifest.json").write_text(json.dumps(_mutate(manifest, path, value)))
        else:
            victim = out / data.draw(st.sampled_from(sorted(p.name for p in out.glob("shard_*"))))
            content = victim.read_bytes()
            at = data.draw(st.integers(0, len(content) - 1))
            flipped = content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1 :]
            victim.write_bytes(data.draw(st.sampled_from([content[:at], flipped])))
        try:
            ds = ShardDataset(out)
            ds.verify(full=True)
            ds.get_batch([0, len(ds) - 1])
        except ShardError as e:
            assert str(out) in str(e)
