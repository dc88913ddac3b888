"""Hostile input to the run and fine-tuning configs and to the task readers (issues 21 and 25): each generated case
loads, or is refused with a message naming the file or the key (ConfigError or TaskError, which `earlybert train`
and `finetune` turn into exit 2 before any process group); never another exception. Property-based (Hypothesis),
bounded by max_examples so the file runs in about a minute; plus the fine-tuning cases of tests/faults_table.py."""

import csv
import dataclasses
import json
import typing

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults_table import CASES, tried
from pipeline.config import ConfigError
from pipeline.finetune.config import FinetuneConfig, load_finetune_config
from pipeline.finetune.tasks import TaskConfig, TaskError, load_task
from pipeline.pretrain.config import PretrainConfig, load_pretrain_config

BOUNDED = settings(
    max_examples=40,
    deadline=None,  # the first example pays for imports (DeepSpeed's config parse)
    derandomize=True,  # the same cases in every run: a failure is reproduced by running the test again
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def dotted_keys(cls, prefix: str = "") -> list[str]:
    """Every key of a config dataclass, dotted (phases.0.steps for a list of dataclasses)."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys += dotted_keys(typing.get_args(tp)[0], key + ".0.")
    return keys


RUN_KEYS, FINETUNE_KEYS = dotted_keys(PretrainConfig), dotted_keys(FinetuneConfig)

# YAML that breaks loaders: deep, cyclic, a bomb, tags, anchors, NUL, odd scalars.
NASTY_YAML = [
    "[" * 3000 + "]" * 3000,
    "- " * 3000 + "x",
    "&a [*a]",
    "&a {x: *a}",
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
    "!!python/object/apply:os.system [true]",
    "!!binary AAAA",
    "!!set {a, b}",
    "{? [1, 2] : x}",
    "*undefined",
    ".nan",
    "-.inf",
    "1e999",
    "0x7fffffffffffffffffff",
    "~",
    "'\x00'",
    "\x00",
    "\t",
    "{a: 1, a: 2}",
    "<<: {x: 1}",
]

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def documents(valid: dict) -> st.SearchStrategy[bytes]:
    """A config file's bytes: random bytes, the valid config with one key replaced (wrong types, unknown keys,
    nasty YAML), or cut, repeated (duplicate keys) or with bytes spliced in."""
    text = yaml.safe_dump(valid, sort_keys=False).encode()
    lines = text.splitlines(keepends=True)
    replaced = st.builds(
        lambda key, value: yaml.safe_dump({**valid, key: value}, sort_keys=False).encode(),
        st.sampled_from([*valid, "unknown_key"]),
        yaml_values,
    )
    nasty = st.builds(
        lambda key, snippet: text + f"{key}: {snippet}\n".encode(),
        st.sampled_from([*valid, "unknown_key"]),
        st.sampled_from(NASTY_YAML),
    )
    spliced = st.builds(
        lambda at, junk: text[:at] + junk + text[at:], st.integers(0, len(text)), st.binary(min_size=1, max_size=8)
    )
    return st.one_of(
        st.binary(max_size=200),
        st.just(b""),
        replaced,
        nasty,
        spliced,
        st.integers(0, len(text)).map(lambda at: text[:at]),
        st.sampled_from(lines).map(lambda line: text + line),
    )


def overrides(keys: list[str]) -> st.SearchStrategy[list[str]]:
    value = st.one_of(st.text(max_size=12), st.sampled_from(NASTY_YAML), yaml_values.map(yaml.safe_dump))
    key = st.one_of(st.sampled_from(keys), st.text(max_size=10))
    return st.lists(st.builds(lambda k, v: f"{k}={v}", key, value), max_size=2)


def assert_named(err: Exception, path, keys: list[str]) -> None:
    """A refusal names the file, an override, or a key of the config."""
    message = str(err)
    assert message and "Traceback" not in message
    assert str(path) in message or "override" in message or any(k in message for k in keys), message


@pytest.fixture(scope="module")
def valid_run():
    """The mapping of a run config that loads (the shards need not exist: load_pretrain_config does not open them)."""
    return {
        "run_dir": "run",
        "phases": [{"shards": "data/seq32", "steps": 10}],
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "optim": {"lr": 1.0e-3, "warmup_steps": 2},
        "deepspeed_overrides": {"zero_optimization": {"stage": 1}},
    }


@pytest.fixture(scope="module")
def valid_finetune():
    return {
        "run_dir": "run",
        "task": {"kind": "classification", "train_files": ["train.csv"], "validation_files": ["dev.csv"]},
        "model": {"init_from": "model"},
        "micro_batch_size": 8,
        "global_batch_size": 8,
    }


@tried("hostile_run_config")
@BOUNDED
@given(data=st.data())
def test_the_run_config_loader_loads_or_names_the_problem(valid_run, tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_bytes(data.draw(documents(valid_run)))
    extra = data.draw(overrides(RUN_KEYS))
    try:
        load_pretrain_config(str(path), extra)
    except ConfigError as err:
        assert_named(err, path, RUN_KEYS)


@tried("hostile_finetune_config")
@BOUNDED
@given(data=st.data())
def test_the_finetune_config_loader_loads_or_names_the_problem(valid_finetune, tmp_path, data):
    path = tmp_path / "finetune.yaml"
    path.write_bytes(data.draw(documents(valid_finetune)))
    extra = data.draw(overrides(FINETUNE_KEYS))
    try:
        load_finetune_config(str(path), extra)
    except ConfigError as err:
        assert_named(err, path, FINETUNE_KEYS)


def _rows_file(path, rows: list[dict]) -> None:
    """`rows` in the format of the file's suffix, as a user's tool would write them."""
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=["sentence", "label"], delimiter="," if path.suffix == ".csv" else "\t"
            )
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


cells = st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=6), st.booleans())
table_rows = st.lists(st.fixed_dictionaries({"sentence": cells, "label": cells}), min_size=1, max_size=6).filter(
    lambda rows: len({tuple(map(type, r.values())) for r in rows}) == 1
)  # Parquet wants one type a column


@tried("hostile_task_files")
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".json"])
@settings(BOUNDED, max_examples=12)
@given(data=st.data())
def test_task_readers_read_or_name_the_file(tmp_path, suffix, data):
    path = tmp_path / f"train{suffix}"
    if suffix == ".json":  # SQuAD JSON: random bytes, or a random tree where the format has a list of articles
        tree = data.draw(yaml_values.map(lambda v: {"data": v}) | yaml_values)
        content = data.draw(st.binary(max_size=100) | st.just(json.dumps(tree).encode()))
        path.write_bytes(content)
    elif data.draw(st.booleans()):
        path.write_bytes(data.draw(st.binary(max_size=200)))
    else:
        _rows_file(path, data.draw(table_rows))
    kind = "qa" if suffix == ".json" else "classification"
    try:
        load_task(
            TaskConfig(kind=kind, train_files=[str(path)], **({} if kind == "qa" else {"text_fields": ["sentence"]}))
        )
    except TaskError as err:
        assert str(path) in str(err), err


# ---- fine-tuning cases of the fault table ---------------------------------------------------------------------


@tried("finetune_validation_files_list")
def test_validation_files_take_a_list_or_a_file_as_train_files_do(ft_config, task_files):
    dev = str(task_files / "dev.csv")
    for value in (f"[{dev}]", dev):
        cfg = load_finetune_config(str(ft_config), [f"task.validation_files={value}"])
        assert cfg.task.validation_files == {"validation": [dev]}
    assert load_finetune_config(str(ft_config), [f"task.train_files={dev}"]).task.train_files == [dev]


@tried("finetune_validation_only_label")
def test_a_validation_label_absent_from_training_is_refused(tmp_path):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    _rows_file(train, [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}])
    _rows_file(dev, [{"sentence": "c", "label": "x"}, {"sentence": "d", "label": "z"}])
    with pytest.raises(TaskError, match=rf"{dev}: label\(s\) z are not among the labels in the training data"):
        load_task(TaskConfig(train_files=[str(train)], validation_files=[str(dev)], text_fields=["sentence"]))
    numbers = tmp_path / "numbers.csv"
    _rows_file(numbers, [{"sentence": "c", "label": 0}, {"sentence": "d", "label": 2}])
    _rows_file(train, [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}])
    with pytest.raises(TaskError, match=r"label\(s\) 2 do not fit 2 classes \(ids 0..1: the training data"):
        load_task(TaskConfig(train_files=[str(train)], validation_files=[str(numbers)], text_fields=["sentence"]))


@tried("finetune_squad_answers_outside")
def test_a_squad_file_whose_answers_all_lie_outside_their_contexts_is_refused(tokenizer, tmp_path):
    from pipeline.finetune.squad import prepare_train_features
    from pipeline.finetune.tasks import read_squad_json

    qas = [{"id": f"q{i}", "question": "where?", "answers": [{"text": "paris", "answer_start": 40}]} for i in range(3)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "paris is a city", "qas": qas}]}]}))
    with pytest.raises(TaskError, match="no training question has its answer text at its answer_start"):
        prepare_train_features(Dataset.from_list(read_squad_json(path)), tokenizer, 64, 32, 16)


def _refused_finetune(ft_config, tmp_path, capsys, overrides, message, case):
    from pipeline.finetune.loop import main

    code = main(["--config", str(ft_config), f"run_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert code == CASES[case].exit and message in err, err
    assert not (tmp_path / "run").exists()


@tried("finetune_init_from_junk")
def test_init_from_a_directory_without_a_model_is_named(ft_config, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_bytes(b"\x00\xff" * 100)
    message = f"model.init_from {junk} holds no tokenizer (tokenizer.json, tokenizer_config.json, vocab.txt)"
    _refused_finetune(ft_config, tmp_path, capsys, [f"model.init_from={junk}"], message, "finetune_init_from_junk")


@tried("finetune_tokenizer_beyond_model")
def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(ft_config, hf_bert, tmp_path, capsys):
    tokenizer = json.loads((hf_bert / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"extra{i}": len(vocab) + i for i in range(100)})
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps(tokenizer))
    message = f"the tokenizer ({bigger}: {len(vocab)} ids) is larger than the model's vocabulary ({len(vocab) - 100}"
    _refused_finetune(
        ft_config, tmp_path, capsys, [f"model.tokenizer={bigger}"], message, "finetune_tokenizer_beyond_model"
    )
