"""Everyday use: the command line (--version, fast --help, --print-config), configs that work from any
directory, `earlybert prep` on fsspec URLs, streamed `datasets` and tokenizer directories, and
`earlybert eval`'s progress."""

import hashlib
import importlib.metadata
import json
import random
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.cli import main as prep_main
from data_prep.prep import PrepConfig, run_prep
from data_prep.readers import InputError, discover
from data_prep.wordpiece import train_wordpiece
from pipeline.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# ---- the command line ---------------------------------------------------------------------------


def test_version_and_bare_command(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"earlybert {importlib.metadata.version('earlybert')}\n"
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: earlybert <stage>") and all(f"  {s} " in out for s in ("prep", "train", "finetune"))


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_help_answers_without_importing_torch(stage):
    code = (
        f"import sys\nfrom pipeline.cli import main\ntry:\n    main([{stage!r}, '--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\nprint(sorted({'torch', 'deepspeed'} & set(sys.modules)))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.endswith("[]\n"), out
    assert "--print-config" in out and "Config reference" in out and f"earlybert {stage} --config" in out


def test_defaults_are_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        prep_main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 128)" in out and "(default: 32768)" in out and "--output DIR" in out


# ---- prep: where the data is ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("everyday_corpus")
    words = "the model reads long documents and learns which heads matter for the task at hand".split()
    rng = random.Random(0)
    docs = ["\n".join(" ".join(rng.choices(words, k=12)).capitalize() + "." for _ in range(6)) for _ in range(60)]
    (d / "corpus.txt").write_text("".join(doc + "\n\n" for doc in docs))
    pq.write_table(pa.table({"text": docs}), d / "corpus.parquet")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    (d / "tok").mkdir()
    train_wordpiece([str(d / "corpus.txt")], d / "tok" / "tokenizer.json", vocab_size=300, min_frequency=1)
    return d


def prep(inputs, out, tokenizer) -> dict:
    run_prep(
        PrepConfig(
            inputs=inputs,
            output=str(out),
            tokenizer=str(tokenizer),
            seq_len=32,
            workers=1,
            shard_sequences=50,
            unit_bytes=4096,
            progress=False,
        )
    )
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).glob("shard_*"))}


def test_fsspec_urls_and_tokenizer_directory_give_the_same_shards(small_corpus, tmp_path):
    d = small_corpus
    local = prep([str(d / "corpus.txt")], tmp_path / "local", d / "tok" / "tokenizer.json")
    assert len(local) >= 4
    assert prep([f"file://{d}/corpus.txt"], tmp_path / "file", d / "tok") == local  # a tokenizer directory
    assert prep([f"file://{d}/*.txt"], tmp_path / "glob", d / "tok") == local
    memory = fsspec.filesystem("memory")
    memory.pipe("/everyday/sub/corpus.txt", (d / "corpus.txt").read_bytes())
    assert prep(["memory:///everyday"], tmp_path / "memory", d / "tok") == local  # a directory
    manifest = json.loads((tmp_path / "memory" / "manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == ["memory:///everyday/sub/corpus.txt"]


def test_streamed_dataset_by_name(small_corpus, tmp_path):
    d = small_corpus
    # the same records, read from Parquet and streamed by `datasets` from a JSONL file: the same shards
    parquet = prep([str(d / "corpus.parquet")], tmp_path / "parquet", d / "tok")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_bytes((d / "corpus.jsonl").read_bytes())
    assert prep([f"dataset:{tmp_path / 'ds'}"], tmp_path / "streamed", d / "tok") == parquet
    assert [s.kind for s in discover([f"dataset:{tmp_path / 'ds'}:train"])] == ["stream"]
    with pytest.raises(InputError, match="check its name, config and split"):
        discover([f"dataset:{tmp_path / 'ds'}:nosuchsplit"])


def test_bad_urls_name_the_url(tmp_path):
    with pytest.raises(InputError, match="memory:///nothing/here"):
        discover(["memory:///nothing/here"])
    with pytest.raises(InputError, match="dataset:NAME:CONFIG:SPLIT"):
        discover(["dataset:a:b:c:d"])


def test_tokenizer_output_may_be_a_directory(small_corpus, tmp_path):
    assert (
        prep_main(
            [
                "tokenizer",
                "--input",
                str(small_corpus / "corpus.txt"),
                "--output",
                str(tmp_path),
                "--vocab-size",
                "300",
                "--min-frequency",
                "1",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


# ---- eval -----------------------------------------------------------------------------------------


def test_eval_reports_progress_as_lines_off_a_terminal(small_corpus, tmp_path, capsys, monkeypatch):
    from data_prep import ShardDataset
    from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining
    from pipeline.tools.masked_lm_eval import evaluate

    prep([str(small_corpus / "corpus.txt")], tmp_path / "shards", small_corpus / "tok")
    shards = ShardDataset(tmp_path / "shards")
    capsys.readouterr()
    model = EarlyBertForPreTraining(EarlyBertConfig.from_preset("bert-tiny", vocab_size=shards.vocab_size))
    monkeypatch.setenv("EARLYBERT_PROGRESS_SECONDS", "0")
    result = evaluate(model, shards, max_sequences=40, batch_size=16, progress=True)
    assert result["sequences"] == 40 and result["masked_tokens"] > 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "eval: 40 seq to do" and lines[-1].startswith("eval: 40 seq done") and len(lines) >= 4
