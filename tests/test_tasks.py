"""pipeline/finetune/tasks.py: reading task data, label ids, features, GLUE metrics, and every bad-input error."""

import csv
import json
import math

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from pipeline.finetune import tasks
from pipeline.finetune.tasks import (
    TaskConfig,
    TaskError,
    compute_metrics,
    encode_classification,
    encode_token_classification,
    load_task,
    task_spec,
)


def write_rows(path, rows, header=None):
    """rows as CSV (quoted where needed), TSV (as GLUE's: never quoted), JSONL or Parquet, by the file's suffix."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    elif path.suffix == ".tsv":
        path.write_text("".join("\t".join(map(str, r)) + "\n" for r in [header, *rows]))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows))
    else:
        Dataset.from_list([dict(zip(header, r)) for r in rows]).to_parquet(str(path))
    return str(path)


# ---- metrics ----------------------------------------------------------------------------------


def test_matthews_of_a_confusion_matrix():
    # TP=3 TN=2 FP=1 FN=1: MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 5 / 12
    labels = [1, 1, 1, 1, 0, 0, 0]
    pred = [1, 1, 1, 0, 0, 0, 1]
    assert compute_metrics(tasks.TASKS["cola"], pred, labels) == pytest.approx({"matthews_correlation": 5 / 12})


def test_f1_and_accuracy_from_logits():
    # predictions 1 1 0 0 1 against 1 0 0 1 1: TP=2 FP=1 FN=1 -> F1 = 2*2 / (2*2 + 1 + 1); 3 of 5 right
    logits = np.array([[0.1, 0.9], [0.2, 0.3], [2.0, -1.0], [0.5, 0.4], [-3.0, 3.0]])
    result = compute_metrics(tasks.TASKS["mrpc"], logits, [1, 0, 0, 1, 1])
    assert result == pytest.approx({"f1": 4 / 6, "accuracy": 3 / 5})


def test_pearson_and_spearman_by_their_definitions():
    pred, labels = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0])
    dx, dy = pred - pred.mean(), labels - labels.mean()
    pearson = (dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum())  # 6.5 / sqrt(5 * 8.75)
    result = compute_metrics(tasks.TASKS["stsb"], pred[:, None], labels)
    assert result == pytest.approx({"pearson": pearson, "spearman": 1.0})  # same order: rank correlation 1
    assert pearson == pytest.approx(0.98271, abs=1e-5)


def test_unnamed_tasks_metrics():
    spec = task_spec(TaskConfig(train_files=["unused.csv"]))
    # classes 0 1 2, predictions 0 1 1 2 2 against 0 1 2 2 0: class F1s 2/3, 2/3, 1/2 -> macro 11/18
    assert compute_metrics(spec, [0, 1, 1, 2, 2], [0, 1, 2, 2, 0]) == pytest.approx(
        {"accuracy": 3 / 5, "macro_f1": 11 / 18}
    )
    spec = task_spec(TaskConfig(kind="regression", train_files=["unused.csv"]))
    result = compute_metrics(spec, [1.0, 2.0, 4.0], [1.0, 3.0, 5.0])
    assert result["mse"] == pytest.approx((0 + 1 + 1) / 3) and result["spearman"] == pytest.approx(1.0)


def test_glue_registry():
    assert {name: spec.metric for name, spec in tasks.TASKS.items() if spec.kind != "qa"} == {
        "cola": "matthews",
        "sst2": "accuracy",
        "mrpc": "f1_accuracy",
        "qqp": "f1_accuracy",
        "stsb": "pearson_spearman",
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
        "wnli": "accuracy",
    }
    assert tasks.TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert tasks.TASKS["stsb"].num_labels == 1 and tasks.TASKS["mnli"].id2label[2] == "contradiction"


# ---- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_string_labels_are_numbered_in_sorted_order(tmp_path, suffix):
    header = ["text", "label"]
    train = write_rows(
        tmp_path / f"train{suffix}", [["good film", "pos"], ['"bad" film', "neg"], ["so so", "mid"]], header
    )
    dev = write_rows(tmp_path / f"dev{suffix}", [["great", "pos"]], header)
    data = load_task(TaskConfig(train_files=[train], validation_files=[dev]))
    assert data.spec.label_names == ("mid", "neg", "pos") and data.spec.num_labels == 3
    assert data.train["label"] == [2, 1, 0] and list(data.validation) == ["validation"]
    assert data.validation["validation"]["label"] == [2]
    assert data.train["text"][1] == '"bad" film'  # TSV: a quote is an ordinary character


def test_glue_task_from_local_files(tmp_path):
    """MNLI: two validation sets by name, string labels in the hub's order (not sorted), the task's columns."""
    header = ["premise", "hypothesis", "label"]
    rows = [["a man sleeps", "a person rests", "entailment"], ["a dog runs", "a cat runs", "contradiction"]]
    train = write_rows(tmp_path / "train.tsv", rows, header)
    matched = write_rows(tmp_path / "m.tsv", rows[:1], header)
    mismatched = write_rows(tmp_path / "mm.tsv", rows[1:], header)
    validation = {"validation_matched": matched, "validation_mismatched": [mismatched]}
    data = load_task(TaskConfig(name="mnli", train_files=[train], validation_files=validation))
    assert data.spec.label_names == ("entailment", "neutral", "contradiction")
    assert data.train["label"] == [0, 2]
    assert {k: v["label"] for k, v in data.validation.items()} == {
        "validation_matched": [0],
        "validation_mismatched": [2],
    }


def test_integer_and_regression_labels(tmp_path):
    train = write_rows(tmp_path / "t.csv", [["a", "b", 1], ["c", "d", 0]], ["s1", "s2", "y"])
    data = load_task(TaskConfig(train_files=[train], text_fields=["s1", "s2"], label_field="y", num_labels=3))
    assert data.spec.label_names == ("0", "1", "2") and data.train["y"] == [1, 0]
    scores = write_rows(tmp_path / "s.csv", [["a", "b", 4.5], ["c", "d", 1]], ["sentence1", "sentence2", "label"])
    data = load_task(TaskConfig(name="stsb", train_files=[scores]))
    assert data.spec.kind == "regression" and data.train["label"] == [4.5, 1.0]


def test_hub_dataset_name_and_class_labels(monkeypatch):
    calls = []
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    split = Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [1]}, features=features)

    def fake_load_dataset(path, config):
        calls.append((path, config))
        return DatasetDict({"train": split, "validation_matched": split, "validation_mismatched": split})

    monkeypatch.setattr(tasks, "load_dataset", fake_load_dataset)
    data = load_task(TaskConfig(name="mnli"))
    assert calls == [("glue", "mnli")] and sorted(data.validation) == ["validation_matched", "validation_mismatched"]
    data = load_task(TaskConfig(dataset="someone/nli:", text_fields=["premise", "hypothesis"]))
    assert calls[-1] == ("someone/nli", None) and data.spec.label_names == ("entailment", "neutral", "contradiction")
    assert list(data.validation) == ["validation_matched", "validation_mismatched"]
    with pytest.raises(TaskError, match="no split validation; its splits: train, validation_matched"):
        load_task(TaskConfig(name="rte", dataset="glue/mnli"))


def test_split_dataset_name():
    assert tasks.split_dataset_name("glue/sst2") == ("glue", "sst2")
    assert tasks.split_dataset_name("squad") == ("squad", None)
    assert tasks.split_dataset_name("nyu-mll/glue/cola") == ("nyu-mll/glue", "cola")
    assert tasks.split_dataset_name("rajpurkar/squad:") == ("rajpurkar/squad", None)


def test_squad_json_reader(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(
        json.dumps(
            {
                "version": "v2.0",
                "data": [
                    {
                        "title": "T",
                        "paragraphs": [
                            {
                                "context": "Paris is in France.",
                                "qas": [
                                    {
                                        "id": "q1",
                                        "question": "Where?",
                                        "answers": [{"text": "France", "answer_start": 12}],
                                    },
                                    {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True},
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    data = load_task(TaskConfig(name="squad_v2", train_files=[str(path)]))
    assert data.spec.version_2_with_negative and data.train["is_impossible"] == [False, True]
    assert data.train[0]["answers"] == {"text": ["France"], "answer_start": [12]}
    with pytest.raises(TaskError, match="1 question.s. have no answer .SQuAD v2.0 data.; set task.name: squad_v2"):
        load_task(TaskConfig(name="squad", train_files=[str(path)]))
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "c", "questions": []}]}]}))
    with pytest.raises(TaskError, match=f"{path}: not in SQuAD format .missing 'qas'."):
        load_task(TaskConfig(name="squad", train_files=[str(path)]))


def test_qa_rows_from_the_hub_and_jsonl(tmp_path, monkeypatch):
    rows = Dataset.from_dict(
        {
            "id": ["1", "2"],
            "q": ["who?", "why?"],
            "c": ["Ann did.", "No idea."],
            "a": [{"text": ["Ann"], "answer_start": [0]}, {"text": [], "answer_start": []}],
        }
    )
    monkeypatch.setattr(tasks, "load_dataset", lambda path, config: DatasetDict({"train": rows, "validation": rows}))
    data = load_task(TaskConfig(name="squad_v2", text_fields=["q", "c"], label_field="a"))
    assert data.train.column_names == ["id", "question", "context", "answers", "is_impossible"]
    assert data.validation["validation"]["is_impossible"] == [False, True]
    monkeypatch.undo()
    path = tmp_path / "train.jsonl"
    rows.to_json(str(path))
    data = load_task(
        TaskConfig(
            kind="qa", version_2_with_negative=True, train_files=[str(path)], text_fields=["q", "c"], label_field="a"
        )
    )
    assert data.spec.metric == "squad_v2" and data.train[0]["answers"] == {"text": ["Ann"], "answer_start": [0]}
    with pytest.raises(TaskError, match="column a must hold {text: \\[...\\], answer_start: \\[...\\]}"):
        load_task(
            TaskConfig(
                kind="qa",
                train_files=[write_rows(tmp_path / "flat.csv", [["1", "q", "c", "x"]], ["id", "q", "c", "a"])],
                text_fields=["q", "c"],
                label_field="a",
            )
        )


# ---- features ---------------------------------------------------------------------------------


def test_encode_pairs_and_count_truncation(tokenizer):
    rows = Dataset.from_dict(
        {"a": ["the cat", "the cat sat on the mat " * 20], "b": ["sat", "on the mat"], "label": [1, 0]}
    )
    spec = task_spec(TaskConfig(train_files=["unused.csv"], text_fields=["a", "b"]))
    features, truncated = encode_classification(rows, tokenizer, spec, max_length=16)
    assert truncated == 1 and features.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    short = features[0]
    a, b = tokenizer.tokenize("the cat"), tokenizer.tokenize("sat")
    assert tokenizer.convert_ids_to_tokens(short["input_ids"]) == ["[CLS]", *a, "[SEP]", *b, "[SEP]"]
    assert short["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1) and short["labels"] == 1
    long = features[1]
    assert len(long["input_ids"]) == 16 and long["token_type_ids"][-1] == 1  # longest first: both texts kept
    assert features.features["labels"].dtype == "int64"


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(name="sst3"), "task.name 'sst3' is not a known task; choose one of cola, sst2"),
        (dict(kind="ranking", train_files=["x.csv"]), "task.kind 'ranking': choose one of"),
        (dict(name="stsb", kind="classification"), "stsb is a regression task, but task.kind is classification"),
        (dict(train_files=["x.csv"], text_fields=["a", "b", "c"]), "give one column .single text. or two"),
        (dict(), "give the training data"),
        (dict(dataset="glue/rte", train_files=["x.csv"]), "task.dataset and task.train_files are both set"),
        (dict(kind="qa", train_files=["x.json"], max_query_length=126), "leaves no room for the context"),
        (dict(train_files=["x.csv"], doc_stride=0), "task.doc_stride must be >= 1"),
        (dict(kind="token_classification", train_files=["x.jsonl"], text_fields=["a", "b"]), "token_classific"),
        (dict(kind="regression", train_files=["x.csv"], label_names=["a", "b"]), "a regression task has no class"),
        (dict(name="sst2", label_names=["a", "b"]), "task.name sst2 has its own labels"),
        (dict(train_files=["x.csv"], label_names=["O", "O"]), "a list of distinct names"),
        (dict(train_files=["x.csv"], label_names=["O", "B-X"], num_labels=3), "task.label_names has 2 names"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(TaskError, match=message):
        TaskConfig(**cfg)


def test_data_errors(tmp_path):
    header = ["sentence", "label"]
    good = write_rows(tmp_path / "good.csv", [["fine", 0], ["also fine", 1]], header)

    def fails(message, **cfg):
        with pytest.raises(TaskError, match=message):
            load_task(TaskConfig(**cfg))

    fails(f"{good}: no column text; its columns are sentence, label; set task.text_fields", train_files=[good])
    fails(
        f"{good}: no column y; its columns are sentence, label",
        train_files=[good],
        text_fields=["sentence"],
        label_field="y",
    )
    fails(
        r"label\(s\) 2 do not fit 2 classes \(ids 0..1\)",
        train_files=[write_rows(tmp_path / "three.csv", [["a", 2], ["b", 0]], header)],
        name="sst2",
    )
    fails(
        r"label\(s\) 2, 5 do not fit 2 classes",
        train_files=[good],
        text_fields=["sentence"],
        num_labels=2,
        validation_files=[write_rows(tmp_path / "five.csv", [["a", 5], ["b", 2]], header)],
    )
    strings = write_rows(tmp_path / "s.csv", [["a", "x"], ["b", "y"], ["c", "z"]], header)
    fails(
        r"3 label names \(x, y, z\) but task.num_labels=2",
        train_files=[strings],
        text_fields=["sentence"],
        num_labels=2,
    )
    fails(
        r"label\(s\) x, y, z are not among the task's labels entailment, not_entailment",
        train_files=[
            write_rows(
                tmp_path / "r.csv",
                [["a", "b", "x"], ["c", "d", "y"], ["e", "f", "z"]],
                ["sentence1", "sentence2", "label"],
            )
        ],
        name="rte",
    )
    fails("must hold numbers", train_files=[strings], text_fields=["sentence"], kind="regression")
    fails(
        r"mixes class ids and other values \(0.5\)",
        text_fields=["sentence"],
        train_files=[write_rows(tmp_path / "f.csv", [["a", 0.5], ["b", 1]], header)],
    )
    fails(
        r"1 row\(s\) have no sentence \(first: row 1\)",
        name="sst2",
        train_files=[write_rows(tmp_path / "gap.csv", [["a", 0], ["", 1]], header)],
    )
    empty = write_rows(tmp_path / "empty.csv", [], header)
    fails(f"{empty}: the validation split has no rows", name="sst2", train_files=[good], validation_files=[empty])
    fails("the train split has no rows", name="sst2", train_files=[_touch(tmp_path / "empty.jsonl", b"\n")])
    no_rows = tmp_path / "empty.parquet"
    Dataset.from_dict({"sentence": [], "label": []}).to_parquet(str(no_rows))
    fails("the train split has no rows", name="sst2", train_files=[str(no_rows)])
    fails(
        r"unsupported file type .xlsx; use .csv, .tsv",
        train_files=[good],
        validation_files=[_touch(tmp_path / "dev.xlsx")],
    )
    fails(f"{tmp_path / 'nope.csv'}: no such file; check task.train_files", train_files=[str(tmp_path / "nope.csv")])
    fails("cannot read as PARQUET", train_files=[_touch(tmp_path / "broken.parquet", b"not parquet")])
    fails("mixes file types", train_files=[good, write_rows(tmp_path / "b.jsonl", [["x", 1]], header)])


def _touch(path, content=b"x"):
    path.write_bytes(content)
    return str(path)


def test_the_tokenizer_hash_does_not_depend_on_the_datasets_cache(ft_config, tmp_path, monkeypatch):
    """A run records the hash of its tokenizer, and a relaunch is refused under another one. Encoding examples
    afresh (a cold datasets cache) leaves truncation settings in the tokenizer's state, reading them from the
    cache does not: the hash is taken before, so a first launch and its relaunch agree whatever was cut."""
    from pipeline.finetune.config import load_finetune_config
    from pipeline.finetune.data import prepare_task

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # cold, then warm
    cfg = load_finetune_config(str(ft_config), [f"run_dir={tmp_path / 'run'}", "task.max_seq_length=9"])
    cold, warm = prepare_task(cfg), prepare_task(cfg)
    assert cold.tokenizer_hash == warm.tokenizer_hash
    assert cold.tokenizer.backend_tokenizer.truncation is not None  # the cold encode did leave its state


# ---- token classification ---------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


NER_TRAIN = [
    {"tokens": ["Ann", "visited", "New", "York"], "ner_tags": ["B-PER", "O", "B-LOC", "I-LOC"]},
    {"tokens": ["Bob", "slept"], "ner_tags": ["B-PER", "O"]},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_string_tags_are_numbered_in_sorted_order(tmp_path, suffix):
    header = ["tokens", "ner_tags"]
    rows = [[r["tokens"], r["ner_tags"]] for r in NER_TRAIN]
    train = write_rows(tmp_path / f"train{suffix}", rows, header)
    dev = write_rows(tmp_path / f"dev{suffix}", rows[1:], header)
    data = load_task(TaskConfig(kind="token_classification", train_files=[train], validation_files=[dev]))
    spec = data.spec
    assert spec.label_names == ("B-LOC", "B-PER", "I-LOC", "O") and spec.num_labels == 4
    assert spec.metric == "seqeval" and spec.auto_class == "AutoModelForTokenClassification"
    assert data.train["ner_tags"] == [[1, 3, 0, 2], [1, 3]] and data.validation["validation"]["ner_tags"] == [[1, 3]]


def test_tag_ids_take_their_names_from_the_hub_feature_or_the_config(tmp_path, monkeypatch):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = Features({"words": Sequence(Value("string")), "tags": Sequence(ClassLabel(names=names))})
    split = Dataset.from_dict({"words": [["Ann", "ran"]], "tags": [[1, 0]]}, features=features)
    monkeypatch.setattr(tasks, "load_dataset", lambda path, config: DatasetDict({"train": split, "validation": split}))
    cfg = TaskConfig(kind="token_classification", dataset="conll2003", text_fields=["words"], label_field="tags")
    data = load_task(cfg)
    assert data.spec.label_names == tuple(names) and data.train["tags"] == [[1, 0]]
    monkeypatch.undo()

    ids = write_jsonl(tmp_path / "ids.jsonl", [{"tokens": ["Ann", "ran"], "ner_tags": [1, 0]}])
    data = load_task(TaskConfig(kind="token_classification", train_files=[ids], label_names=names))
    assert data.spec.id2label[1] == "B-PER" and data.train["ner_tags"] == [[1, 0]]
    with pytest.raises(TaskError, match=f"{ids}: column ner_tags holds tag ids without their names; set task.label"):
        load_task(TaskConfig(kind="token_classification", train_files=[ids]))


def test_tags_that_are_no_chunks_are_scored_by_token_accuracy(tmp_path):
    pos = write_jsonl(tmp_path / "pos.jsonl", [{"tokens": ["Ann", "ran"], "pos_tags": ["NNP", "VBD"]}])
    data = load_task(TaskConfig(kind="token_classification", train_files=[pos], label_field="pos_tags"))
    assert data.spec.metric == "token_accuracy"
    # tags per feature, [CLS] and later sub-tokens ignored: 2 of the 3 scored tokens right
    labels = [[-100, 0, 1, -100], [-100, 1, -100]]
    assert compute_metrics(data.spec, [[1, 0, 0, 1], [0, 1, 0]], labels) == {"accuracy": 2 / 3}


def test_token_data_errors(tmp_path):
    def fails(message, rows, train_rows=NER_TRAIN, **cfg):
        train = write_jsonl(tmp_path / "train.jsonl", train_rows)
        validation = write_jsonl(tmp_path / "dev.jsonl", rows)
        with pytest.raises(TaskError, match=message):
            load_task(
                TaskConfig(kind="token_classification", train_files=[train], validation_files=[validation], **cfg)
            )

    dev = str(tmp_path / "dev.jsonl")
    fails(f"{dev}: no column ner_tags; its columns are tokens, tags", [{"tokens": ["a"], "tags": ["O"]}])
    fails(
        f"{dev}: row 1 has 2 words .tokens. but 1 tags .ner_tags.; give one tag per word",
        [NER_TRAIN[1], {"tokens": ["a", "b"], "ner_tags": ["O"]}],
    )
    fails(
        rf"{dev}: tag\(s\) B-ORG are not among the tags of the training data .*train.jsonl., which are B-LOC, B-PER",
        [{"tokens": ["Acme"], "ner_tags": ["B-ORG"]}],
    )
    fails(f"{dev}: row 1: tokens is 'c d', not a list", [NER_TRAIN[1], {"tokens": "c d", "ner_tags": ["O", "O"]}])
    fails(f"{dev}: row 0: ner_tags is None, not a list", [{"tokens": ["a"], "ner_tags": None}])
    fails(f"{dev}: row 0: tokens holds a non-word", [{"tokens": ["a", None], "ner_tags": ["O", "O"]}])
    fails(r"holds 1.5 among its tags; give every tag as a name", [{"tokens": ["a"], "ner_tags": [1.5]}])
    fails(r"task.num_labels=3 but the task has 4 tags \(B-LOC, B-PER, I-LOC, O\)", [NER_TRAIN[1]], num_labels=3)
    ids = [{"tokens": ["a", "b"], "ner_tags": [0, 1]}]
    fails(
        r"tag id\(s\) 7 do not fit the 2 tags O, B-X",
        [{"tokens": ["a"], "ner_tags": [7]}],
        ids,
        label_names=["O", "B-X"],
    )
    fails(
        f"{dev}: column ner_tags holds 'O' among its tags",
        [{"tokens": ["a"], "ner_tags": ["O"]}],
        ids,
        label_names=["O", "B-X"],
    )


def test_token_labels_sit_on_each_words_first_sub_token(tokenizer):
    """transformers' alignment: a word's tag on its first sub-token, -100 on its other sub-tokens and on the
    special tokens; a long row is cut to max_length, counted, and its cut words carry no label."""
    words = ["the", "capitalisation", "of", "france"]
    pieces = [tokenizer.tokenize(w) for w in words]
    assert len(pieces[1]) > 1  # a word of several sub-tokens
    rows = Dataset.from_dict({"tokens": [words, words * 10], "ner_tags": [[3, 1, 3, 0], [3, 1, 3, 0] * 10]})
    spec = task_spec(TaskConfig(kind="token_classification", train_files=["unused.jsonl"]))
    features, truncated = encode_token_classification(rows, tokenizer, spec, max_length=16)
    assert truncated == 1
    first = features[0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == ["[CLS]", *[p for w in pieces for p in w], "[SEP]"]
    expected = [-100]
    for tag, word_pieces in zip([3, 1, 3, 0], pieces):
        expected += [tag] + [-100] * (len(word_pieces) - 1)
    assert first["labels"] == expected + [-100]
    assert first["token_type_ids"] == [0] * len(expected + [-100]) and sum(first["attention_mask"]) == len(expected) + 1
    cut = features[1]
    assert len(cut["input_ids"]) == len(cut["labels"]) == 16 and cut["labels"][: len(expected)] == expected
    assert cut["labels"][-1] == -100 and tokenizer.convert_ids_to_tokens(cut["input_ids"])[-1] == "[SEP]"


def test_collate_pads_token_labels_with_the_ignored_label(tokenizer):
    from pipeline.finetune.data import collate

    rows = Dataset.from_dict({"tokens": [["the", "cat"], ["the"]], "ner_tags": [[0, 1], [1]]})
    spec = task_spec(TaskConfig(kind="token_classification", train_files=["unused.jsonl"]))
    features, _ = encode_token_classification(rows, tokenizer, spec, max_length=16)
    batch = collate(features, [0, 1], tokenizer)
    assert batch["labels"].tolist() == [[-100, 0, 1, -100], [-100, 1, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_entity_level_scores_of_a_hand_made_case():
    """CoNLL's counting: an entity is right only if its type and both ends are. True entities: PER (Ann), LOC (New
    York), ORG (Acme), PER (Bob); predicted: PER (Ann) right, LOC (New) wrong end, ORG (Acme) right, none for Bob:
    2 of 3 predicted entities right, 2 of 4 true ones found: P 2/3, R 1/2, F1 = 2PR/(P+R) = 4/7."""
    names = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
    spec = tasks.TaskSpec("token_classification", ("tokens",), "ner_tags", "seqeval", names)
    ids = {name: i for i, name in enumerate(names)}

    def features(*sentences):  # [CLS] tags [SEP] as ids; logits one-hot where logits are asked for
        return [[-100] + [ids[t] for t in tags] + [-100] for tags in sentences]

    true = features(["B-PER", "O", "B-LOC", "I-LOC"], ["B-ORG", "O", "B-PER"])
    pred = features(["B-PER", "O", "B-LOC", "O"], ["B-ORG", "O", "O"])
    logits = [np.eye(len(names))[np.maximum(p, 0)] for p in pred]
    expected = {"f1": 4 / 7, "precision": 2 / 3, "recall": 1 / 2, "accuracy": 5 / 7}  # 5 of 7 words tagged right
    assert compute_metrics(spec, logits, true) == pytest.approx(expected)
    assert list(compute_metrics(spec, logits, true))[0] == "f1"  # the number the run is judged by


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_each_familys_token_classifier_takes_a_collated_batch(tokenizer, family):
    """The family's class for spec.auto_class (as start.py chooses it) trains on a collated batch of tagged words:
    its loss is the cross-entropy of the labelled tokens alone, and its per-token logits are scored."""
    import torch

    from pipeline.families import FAMILIES
    from pipeline.finetune.data import collate

    rows = Dataset.from_dict(
        {"tokens": [["the", "capitalisation", "of", "france"], ["paris"]], "ner_tags": [[1, 2, 1, 0], [0]]}
    )
    spec = tasks.TaskSpec("token_classification", ("tokens",), "ner_tags", "seqeval", ("B-LOC", "O", "B-X"))
    features, _ = encode_token_classification(rows, tokenizer, spec, max_length=16)
    batch = collate(features, [0, 1], tokenizer)
    f = FAMILIES[family]
    torch.manual_seed(0)
    fields = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=spec.num_labels)
    config = f.preset(f.default_preset, **fields)
    model = f.classes[spec.auto_class](config).eval()
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, 3)
    scored = batch["labels"] != -100
    assert scored.sum() == 5
    expected = torch.nn.functional.cross_entropy(out.logits[scored], batch["labels"][scored])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    lengths = batch["attention_mask"].sum(1).tolist()
    logits = [x[:n].detach().numpy() for x, n in zip(out.logits, lengths)]
    assert set(compute_metrics(spec, logits, features["labels"])) == {"f1", "precision", "recall", "accuracy"}
