"""Fine-tuning tasks: what `earlybert finetune` reads, how labels become ids, and how it is scored.

A task is described by a `TaskConfig` (the `task` section of the fine-tuning config). `task.name`
picks one of GLUE's nine tasks or SQuAD and supplies the defaults (columns, label names, metric);
everything can also be set by hand for any other classification, regression, extractive QA or token
classification (NER, POS: a tag per word) data. `load_task` reads the data (a `datasets` hub name, or
local CSV/TSV/JSONL/Parquet and SQuAD JSON files) and checks it all before any model exists: a missing
column, a label that does not fit, an empty split or an unreadable file is a `TaskError` that names the
file and the fix, so a long run never dies on its first evaluation. `encode_classification` and
`encode_token_classification` turn rows into model inputs and `compute_metrics` scores predictions with
GLUE's official metrics (scikit-learn and scipy) or CoNLL's entity-level ones (seqeval). SQuAD's
windowing, span decoding and EM/F1 are in pipeline/finetune/squad.py.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, Value, load_dataset
from scipy.stats import pearsonr, spearmanr
from seqeval import metrics as seqeval
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

KINDS = ("classification", "regression", "qa", "token_classification")
# The transformers model class each kind trains (pipeline/families.py: a family's `classes` maps it to its own).
AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "qa": "AutoModelForQuestionAnswering",
    "token_classification": "AutoModelForTokenClassification",
}
# transformers' ignore_index: a token with this label (a word's later sub-tokens, special tokens, padding) has no
# loss and no score.
IGNORED_LABEL = -100
# [CLS] question [SEP] context [SEP]: what a BERT pair adds to the question and the context.
PAIR_SPECIAL_TOKENS = 3
# Local file suffix -> `datasets` packaged builder and its options. TSV follows GLUE's files: tab-separated,
# quotes are ordinary characters (a sentence may start with one).
FILE_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
QA_COLUMNS = ("id", "question", "context", "answers")


class TaskError(ValueError):
    """Task data or settings that cannot work; the message names the file or key and what to change."""


@dataclass
class TaskConfig:
    """The `task` section of the fine-tuning config. None means: the named task's default, else the generic one."""

    # classification, regression, qa or token_classification; None: from `name`, else classification
    kind: str | None = None
    name: str | None = None  # cola sst2 mrpc qqp stsb mnli qnli rte wnli squad squad_v2: defaults for the rest
    dataset: str | None = None  # hub dataset: "glue/sst2" = load_dataset("glue", "sst2"); "owner/name:" = no config
    train_files: list[str] = field(default_factory=list)  # local files: CSV, TSV, JSONL, Parquet; SQuAD JSON for qa
    # split name -> file(s), e.g. {validation_matched: [...]}; a list of files (or one file) is the split "validation"
    validation_files: dict | list[str] = field(default_factory=dict)
    # one or two text columns; default [text]; qa: [question, context] columns; token_classification: the one column
    # of word lists, default [tokens]
    text_fields: list[str] | None = None
    label_field: str | None = None  # default label (qa: answers; token_classification: ner_tags, a tag per word)
    num_labels: int | None = None  # classification: None = as many as the labels show
    # classification, token_classification: the name of each label id, in id order (for labels given as ids without
    # a ClassLabel feature: token classification's metric reads the tags by name)
    label_names: list[str] | None = None
    max_seq_length: int = 128
    doc_stride: int = 128  # qa: tokens between the starts of two windows of a long context (BERT's run_squad)
    max_query_length: int = 64  # qa: questions are cut to this many tokens
    n_best_size: int = 20  # qa: start and end candidates per window
    max_answer_length: int = 30  # qa: longest answer, in tokens
    null_score_diff_threshold: float = 0.0  # squad v2: predict "no answer" when null score - best span score > this
    version_2_with_negative: bool = False  # squad v2: questions may have no answer (implied by name squad_v2)

    def __post_init__(self):
        # A list of validation files (or one file), as train_files takes them, is the one split "validation".
        if isinstance(self.validation_files, str):
            self.validation_files = [self.validation_files]
        if isinstance(self.validation_files, (list, tuple)):
            self.validation_files = {"validation": list(self.validation_files)} if self.validation_files else {}
        self.validation_files = {
            split: [files] if isinstance(files, str) else files for split, files in self.validation_files.items()
        }
        for split, files in self.validation_files.items():
            if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
                raise TaskError(f"task.validation_files.{split}: expected a file or a list of files, got {files!r}")
        validate_task_config(self)


@dataclass(frozen=True)
class TaskSpec:
    """What the training loop needs to know about a task once its data is read."""

    kind: str
    text_fields: tuple[str, ...]
    label_field: str
    metric: str  # a key of METRICS, or squad / squad_v2 (pipeline.finetune.squad.squad_metrics)
    label_names: tuple[str, ...] = ()  # classification, token_classification: label_names[i] is the name of id i
    validation_splits: tuple[str, ...] = ("validation",)  # the hub splits evaluated, each scored on its own
    dataset: str | None = None  # the hub dataset used when no dataset and no files are given
    name: str | None = None

    @property
    def num_labels(self) -> int:
        """Width of the model's output: classes (per token), 1 for regression, start and end logits for QA."""
        return {"regression": 1, "qa": 2}.get(self.kind, len(self.label_names))

    @property
    def auto_class(self) -> str:
        """The transformers Auto class of the task's model, e.g. AutoModelForTokenClassification."""
        return AUTO_CLASSES[self.kind]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def version_2_with_negative(self) -> bool:
        return self.metric == "squad_v2"


def _glue(text_fields, label_names, metric, name, **kw) -> TaskSpec:
    kind = "regression" if not label_names else "classification"
    return TaskSpec(kind, text_fields, "label", metric, label_names, dataset=f"glue/{name}", name=name, **kw)


# GLUE as the hub's `glue` dataset has it: columns, label order (ids 0, 1, ...) and the official metric.
TASKS = {
    "cola": _glue(("sentence",), ("unacceptable", "acceptable"), "matthews", "cola"),
    "sst2": _glue(("sentence",), ("negative", "positive"), "accuracy", "sst2"),
    "mrpc": _glue(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1_accuracy", "mrpc"),
    "qqp": _glue(("question1", "question2"), ("not_duplicate", "duplicate"), "f1_accuracy", "qqp"),
    "stsb": _glue(("sentence1", "sentence2"), (), "pearson_spearman", "stsb"),
    "mnli": _glue(
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        "accuracy",
        "mnli",
        validation_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _glue(("question", "sentence"), ("entailment", "not_entailment"), "accuracy", "qnli"),
    "rte": _glue(("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy", "rte"),
    "wnli": _glue(("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy", "wnli"),
    "squad": TaskSpec("qa", ("question", "context"), "answers", "squad", dataset="squad", name="squad"),
    "squad_v2": TaskSpec("qa", ("question", "context"), "answers", "squad_v2", dataset="squad_v2", name="squad_v2"),
}
GENERIC_METRICS = {
    "classification": "accuracy_macro_f1",
    "regression": "pearson_spearman_mse",
    "qa": "squad",
    "token_classification": "seqeval",  # token_accuracy where the tags are no chunk tags (load_task decides)
}
# The generic columns of each kind.
DEFAULT_COLUMNS = {"qa": (("question", "context"), "answers"), "token_classification": (("tokens",), "ner_tags")}


# ---- config -----------------------------------------------------------------------------------


def validate_task_config(cfg: TaskConfig) -> None:
    """Checks that need no data; TaskConfig runs them on construction, so a config loader sees them at once."""
    if cfg.name is not None and cfg.name not in TASKS:
        raise TaskError(
            f"task.name {cfg.name!r} is not a known task; choose one of {', '.join(TASKS)}, "
            f"or leave it out and set task.kind, task.text_fields and task.label_field"
        )
    if cfg.kind is not None and cfg.kind not in KINDS:
        raise TaskError(f"task.kind {cfg.kind!r}: choose one of {', '.join(KINDS)}")
    if cfg.name and cfg.kind and cfg.kind != TASKS[cfg.name].kind:
        raise TaskError(
            f"task.name {cfg.name} is a {TASKS[cfg.name].kind} task, but task.kind is {cfg.kind}; remove task.kind"
        )
    counts = {"qa": (2,), "token_classification": (1,)}.get(_kind(cfg), (1, 2))
    if cfg.text_fields is not None and len(cfg.text_fields) not in counts:
        raise TaskError(
            f"task.text_fields {cfg.text_fields}: give one column (single text) or two (a pair); "
            f"for qa two: the question's and the context's; for token_classification one: the lists of words"
        )
    if cfg.label_names is not None:
        validate_label_names(cfg)
    if not (cfg.name or cfg.dataset or cfg.train_files):
        raise TaskError(
            "task: give the training data: task.train_files (local files), task.dataset "
            "(a `datasets` hub name) or task.name (a GLUE task or squad, loaded from the hub)"
        )
    if cfg.dataset and cfg.train_files:
        raise TaskError("task.dataset and task.train_files are both set; keep one: a hub dataset or local files")
    if cfg.validation_files and not cfg.train_files:
        raise TaskError("task.validation_files is set but task.train_files is not; give both as local files")
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise TaskError(
            f"task.num_labels must be >= 2 for classification, got {cfg.num_labels}; "
            f"for one real-valued target set task.kind: regression"
        )
    positive = {
        name: getattr(cfg, name)
        for name in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size", "max_answer_length")
    }
    for name, value in positive.items():
        if value < 1:
            raise TaskError(f"task.{name} must be >= 1, got {value}")
    if _kind(cfg) == "qa" and cfg.max_query_length + PAIR_SPECIAL_TOKENS >= cfg.max_seq_length:
        raise TaskError(
            f"task.max_query_length={cfg.max_query_length} leaves no room for the context in "
            f"task.max_seq_length={cfg.max_seq_length}; lower the first or raise the second"
        )


def validate_label_names(cfg: TaskConfig) -> None:
    if _kind(cfg) not in ("classification", "token_classification"):
        raise TaskError(f"task.label_names: a {_kind(cfg)} task has no class labels; remove it")
    if cfg.name:
        raise TaskError(f"task.label_names: task.name {cfg.name} has its own labels; remove task.label_names")
    names = cfg.label_names
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)) or len(set(names)) != len(names):
        raise TaskError(f"task.label_names must be a list of distinct names (strings), got {names!r}")
    if len(names) < 2:
        raise TaskError(f"task.label_names {names}: a classifier needs at least two labels")
    if cfg.num_labels is not None and cfg.num_labels != len(names):
        raise TaskError(
            f"task.num_labels={cfg.num_labels} but task.label_names has {len(names)} names; remove task.num_labels"
        )


def _kind(cfg: TaskConfig) -> str:
    return cfg.kind or (TASKS[cfg.name].kind if cfg.name else "classification")


def task_spec(cfg: TaskConfig) -> TaskSpec:
    """The task as configured, before the data is read (an unnamed classification task has no label names yet)."""
    kind = _kind(cfg)
    columns = DEFAULT_COLUMNS.get(kind, (("text",), "label"))
    base = TASKS[cfg.name] if cfg.name else TaskSpec(kind, *columns, GENERIC_METRICS[kind])
    spec = replace(
        base,
        text_fields=tuple(cfg.text_fields or base.text_fields),
        label_field=cfg.label_field or base.label_field,
        label_names=tuple(cfg.label_names or base.label_names),
    )
    if kind == "qa" and cfg.version_2_with_negative:
        spec = replace(spec, metric="squad_v2")
    return spec


def split_dataset_name(dataset: str) -> tuple[str, str | None]:
    """`task.dataset` -> load_dataset's (path, config): "glue/sst2" -> ("glue", "sst2"), "squad" -> ("squad", None),
    "owner/name/config" -> ("owner/name", "config"); a colon says it outright: "owner/name:" -> ("owner/name", None)."""
    if ":" in dataset:
        path, config = dataset.split(":", 1)
        return path, config or None
    path, _, config = dataset.rpartition("/")
    return (path, config) if path else (dataset, None)


# ---- loading ----------------------------------------------------------------------------------


@dataclass
class TaskData:
    """The task's rows, checked: texts present, labels as ids (classification) or floats (regression).

    For QA the rows are SQuAD's (id, title, context, question, answers {text, answer_start}, is_impossible);
    for token classification a list of words and a list of as many tag ids per row.
    """

    spec: TaskSpec
    train: Dataset
    validation: dict[str, Dataset]  # split name -> rows; each is evaluated and reported on its own


def load_task(cfg: TaskConfig) -> TaskData:
    """Read and check the task's data; every problem is a TaskError raised before any training starts."""
    spec = task_spec(cfg)
    if cfg.train_files:
        splits = {"train": cfg.train_files, **cfg.validation_files}
        data = {split: read_files(files, spec.kind, split) for split, files in splits.items()}
        sources = {split: ", ".join(files) for split, files in splits.items()}
    else:
        dataset = cfg.dataset or spec.dataset
        data = _load_hub(dataset, spec)
        sources = {split: f"dataset {dataset!r} split {split!r}" for split in data}
    for split, rows in data.items():
        if len(rows) == 0:
            raise TaskError(f"{sources[split]}: the {split} split has no rows")
    if spec.kind == "qa":
        data = {split: _check_qa(rows, spec, sources[split]) for split, rows in data.items()}
        spec = replace(spec, text_fields=QA_COLUMNS[1:3], label_field=QA_COLUMNS[3])
    elif spec.kind == "token_classification":
        for split, rows in data.items():
            _check_words_and_tags(rows, spec, sources[split])
        data, spec = _encode_tags(data, spec, cfg.num_labels, sources)
    else:
        for split, rows in data.items():
            _check_texts(rows, spec, sources[split])
        data, spec = _encode_labels(data, spec, cfg.num_labels, sources)
    return TaskData(spec, data.pop("train"), data)


def read_files(files: list[str], kind: str, split: str) -> Dataset:
    """One split from local files of one type; SQuAD JSON (for qa) through read_squad_json."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise TaskError(f"{path}: no such file; check task.{'train' if split == 'train' else 'validation'}_files")
    suffixes = {p.suffix.lower() for p in paths}
    unknown = sorted(suffixes - set(FILE_BUILDERS))
    if unknown:
        raise TaskError(
            f"{', '.join(files)}: unsupported file type {', '.join(unknown)}; "
            f"use {', '.join(FILE_BUILDERS)} (SQuAD-format .json for qa)"
        )
    if len(suffixes) > 1:
        raise TaskError(f"{', '.join(files)}: the {split} split mixes file types; convert them to one")
    (suffix,) = suffixes
    for path in paths:
        if _has_no_rows(path, suffix):
            raise TaskError(f"{path}: the {split} split has no rows in this file; fill it or leave it out")
    if kind == "qa" and suffix == ".json":
        return Dataset.from_list([row for path in paths for row in read_squad_json(path)])
    builder, options = FILE_BUILDERS[suffix]
    try:
        return load_dataset(builder, data_files=[str(p) for p in paths], split="train", **options)
    except Exception as e:  # datasets, pyarrow and pandas each raise their own types for a malformed file
        raise TaskError(f"{', '.join(files)}: cannot read as {suffix[1:].upper()}: {e}") from e


def _has_no_rows(path: Path, suffix: str) -> bool:
    """A data file without rows, told apart before `datasets` reads it: it would fail with a puzzling message
    ('Instruction "train" corresponds to no data') or a bare StopIteration."""
    if suffix == ".parquet":
        try:
            return pq.read_metadata(path).num_rows == 0
        except pa.ArrowException:
            return False  # not Parquet at all: the loader's error says so
    with path.open("rb") as f:
        lines = (line for line in f if line.strip())
        first, second = next(lines, None), next(lines, None)
    return first is None or (suffix in (".csv", ".tsv") and second is None)  # CSV/TSV: a header alone


def read_squad_json(path) -> list[dict]:
    """Flat rows from the official SQuAD format {data: [{title, paragraphs: [{context, qas: [...]}]}]}.

    `datasets`' json loader keeps the nesting, hence this reader. A question without answers is unanswerable
    (the official v2.0 evaluation's definition), whatever its is_impossible flag says.
    """
    try:
        articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        rows = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = qa.get("answers", [])
                    rows.append(
                        {
                            "id": str(qa["id"]),
                            "title": article.get("title", ""),
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": {
                                "text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers],
                            },
                            "is_impossible": not answers,
                        }
                    )
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TaskError(f"{path}: cannot read as SQuAD JSON: {e}") from e
    except (KeyError, TypeError) as e:
        raise TaskError(
            f"{path}: not in SQuAD format (missing {e}); expected {{data: [{{title, paragraphs: "
            f"[{{context, qas: [{{id, question, answers: [{{text, answer_start}}]}}]}}]}}]}}; "
            f"flat rows (id, question, context, answers) go in a .jsonl or .parquet file"
        ) from e
    if not rows:
        raise TaskError(f"{path}: no questions in this SQuAD file")
    return rows


def _load_hub(dataset: str, spec: TaskSpec) -> dict[str, Dataset]:
    path, config = split_dataset_name(dataset)
    try:
        splits = load_dataset(path, config)
    except Exception as e:  # network, unknown name or config: all end the same way
        raise TaskError(
            f"cannot load dataset {dataset!r} (load_dataset({path!r}, {config!r})): {e}; "
            f"without the hub, give local files in task.train_files / task.validation_files"
        ) from e
    validation = spec.validation_splits if spec.name else [s for s in splits if s.startswith("validation")]
    missing = [s for s in ("train", *validation) if s not in splits]
    if missing:
        raise TaskError(f"dataset {dataset!r} has no split {', '.join(missing)}; its splits: {', '.join(splits)}")
    return {split: splits[split] for split in ("train", *validation)}


def _require_columns(rows: Dataset, columns, source: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise TaskError(
            f"{source}: no column {', '.join(missing)}; its columns are {', '.join(rows.column_names)}; "
            f"set task.text_fields / task.label_field to the right ones"
        )


def _check_texts(rows: Dataset, spec: TaskSpec, source: str) -> None:
    _require_columns(rows, (*spec.text_fields, spec.label_field), source)
    for column in spec.text_fields:
        values = rows[column]
        empty = [i for i, v in enumerate(values) if v is None]
        if empty:
            raise TaskError(
                f"{source}: {len(empty)} row(s) have no {column} (first: row {empty[0]}); fill or drop them"
            )
        if not isinstance(values[0], str):
            raise TaskError(
                f"{source}: column {column} holds {type(values[0]).__name__}, not text; check task.text_fields"
            )


def _encode_labels(
    data: dict[str, Dataset], spec: TaskSpec, num_labels: int | None, sources: dict[str, str]
) -> tuple[dict[str, Dataset], TaskSpec]:
    """Labels as class ids (int64) or targets (float32), checked against the label names and task.num_labels.

    Class ids come from the task's label names (GLUE, or a hub ClassLabel) when known, so a string label maps
    to the same id as in the hub dataset; otherwise string labels are numbered in sorted order and integer
    labels are their own ids. The names end up in spec.label_names, to be saved with the model.
    """
    column = spec.label_field
    values = {split: rows[column] for split, rows in data.items()}
    for split, labels in values.items():
        missing = sum(v is None for v in labels)
        if missing:
            raise TaskError(f"{sources[split]}: {missing} row(s) have no {column}; fill or drop them")
    if spec.kind == "regression":
        for split, labels in values.items():
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels):
                raise TaskError(
                    f"{sources[split]}: column {column} of a regression task must hold numbers; "
                    f"for class labels set task.kind: classification"
                )
        return {split: rows.cast_column(column, Value("float32")) for split, rows in data.items()}, spec

    names = spec.label_names or _class_label_names(data["train"], column)
    # Classes the data defines come from the training split alone: a label seen only in validation would be a
    # class the model never trains on, scored as always wrong.
    from_data = f"the labels in the training data ({sources['train']}), which are"
    if all(isinstance(v, str) for labels in values.values() for v in labels):
        names, known = names or tuple(sorted(set(values["train"]))), "the task's labels" if names else from_data
        if num_labels is not None and num_labels != len(names):
            raise TaskError(
                f"{', '.join(sources.values())}: {len(names)} label names ({', '.join(names)}) but "
                f"task.num_labels={num_labels}; fix task.num_labels or remove it"
            )
        ids = _name_ids(values, names, sources, "label", known)
        data = {
            split: rows.map(lambda batch: {column: [ids[v] for v in batch[column]]}, batched=True)
            for split, rows in data.items()
        }
    else:
        for split, labels in values.items():
            bad = [v for v in labels if isinstance(v, (str, bool)) or (isinstance(v, float) and not v.is_integer())]
            if bad:
                raise TaskError(
                    f"{sources[split]}: column {column} mixes class ids and other values ({bad[0]!r}); "
                    f"for real-valued targets set task.kind: regression"
                )
        if names and num_labels is not None and num_labels != len(names):
            raise TaskError(
                f"task.num_labels={num_labels} but the task has {len(names)} labels "
                f"({', '.join(names)}); remove task.num_labels"
            )
        count = len(names) or num_labels or 1 + int(max(values["train"]))
        for split, labels in values.items():
            outside = sorted({int(v) for v in labels if not 0 <= v < count})
            if outside:
                known = "" if names or num_labels else f": the training data ({sources['train']}) has no more"
                raise TaskError(
                    f"{sources[split]}: label(s) {', '.join(map(str, outside))} do not fit {count} "
                    f"classes (ids 0..{count - 1}{known}); fix the labels or set task.num_labels"
                )
        names = names or tuple(str(i) for i in range(count))
    data = {split: rows.cast_column(column, Value("int64")) for split, rows in data.items()}
    return data, replace(spec, label_names=tuple(names))


def _name_ids(
    values: dict[str, list[str]], names: tuple[str, ...], sources: dict[str, str], what: str, known: str, fix: str = ""
) -> dict[str, int]:
    """name -> id, in the order of `names`; a split with other values is a TaskError naming them and `known`."""
    ids = {name: i for i, name in enumerate(names)}
    for split, split_values in values.items():
        unknown = sorted(set(split_values) - set(ids))
        if unknown:
            raise TaskError(
                f"{sources[split]}: {what}(s) {', '.join(unknown)} are not among {known} {', '.join(names)}{fix}"
            )
    return ids


def _class_label_names(rows: Dataset, column: str) -> tuple[str, ...]:
    feature = rows.features[column]
    return tuple(feature.names) if isinstance(feature, ClassLabel) else ()


def _check_words_and_tags(rows: Dataset, spec: TaskSpec, source: str) -> None:
    """Every row: a list of words (strings) and a list of as many tags."""
    (words_column,), tags_column = spec.text_fields, spec.label_field
    _require_columns(rows, (words_column, tags_column), source)
    for i, (words, tags) in enumerate(zip(rows[words_column], rows[tags_column])):
        for column, value in ((words_column, words), (tags_column, tags)):
            if not isinstance(value, list):
                raise TaskError(
                    f"{source}: row {i}: {column} is {value!r}, not a list; token classification reads a list of "
                    f"words ({words_column}) and a list of tags, one per word ({tags_column}), in every row"
                )
        if not all(isinstance(w, str) for w in words):
            raise TaskError(f"{source}: row {i}: {words_column} holds a non-word {words!r}; give words as strings")
        if len(words) != len(tags):
            raise TaskError(
                f"{source}: row {i} has {len(words)} words ({words_column}) but {len(tags)} tags ({tags_column}); "
                f"give one tag per word"
            )


def _encode_tags(
    data: dict[str, Dataset], spec: TaskSpec, num_labels: int | None, sources: dict[str, str]
) -> tuple[dict[str, Dataset], TaskSpec]:
    """Tags as id lists, with their names in spec.label_names: names from task.label_names or the hub's
    Sequence(ClassLabel) feature, else (tags given as strings) those of the training split in sorted order.
    Integer tags need the names: the metric reads entities from them (B-PER, I-PER, O). The metric is CoNLL's
    entity-level one where every tag is a chunk tag, token accuracy otherwise (POS tags)."""
    column = spec.label_field
    tags = {split: [t for row in rows[column] for t in row] for split, rows in data.items()}
    feature = getattr(data["train"].features[column], "feature", None)
    names = spec.label_names or (tuple(feature.names) if isinstance(feature, ClassLabel) else ())
    by_name = all(isinstance(t, str) for t in tags["train"])
    for split, split_tags in tags.items():
        bad = [t for t in split_tags if not (isinstance(t, str) if by_name else _is_id(t))]
        if bad:
            raise TaskError(
                f"{sources[split]}: column {column} holds {bad[0]!r} among its tags; give every tag as a name "
                f"(string) or every tag as an id (integer), in every split"
            )
    if by_name:
        known = "task.label_names" if names else f"the tags of the training data ({sources['train']}), which are"
        names = names or tuple(sorted(set(tags["train"])))
        ids = _name_ids(tags, names, sources, "tag", known, "; fix the data or set task.label_names")
        data = {
            split: rows.map(lambda batch: {column: [[ids[t] for t in row] for row in batch[column]]}, batched=True)
            for split, rows in data.items()
        }
    else:
        if not names:
            raise TaskError(
                f"{sources['train']}: column {column} holds tag ids without their names; set task.label_names "
                f"to the names in id order (e.g. [O, B-PER, I-PER, ...]): the metric reads entities from them"
            )
        for split, split_tags in tags.items():
            outside = sorted({t for t in split_tags if not 0 <= t < len(names)})
            if outside:
                raise TaskError(
                    f"{sources[split]}: tag id(s) {', '.join(map(str, outside))} do not fit the {len(names)} "
                    f"tags {', '.join(names)} (ids 0..{len(names) - 1}); fix the data or task.label_names"
                )
    if num_labels is not None and num_labels != len(names):
        raise TaskError(
            f"task.num_labels={num_labels} but the task has {len(names)} tags ({', '.join(names)}); "
            f"fix task.num_labels or remove it"
        )
    metric = "seqeval" if all(map(is_chunk_tag, names)) else "token_accuracy"
    return data, replace(spec, label_names=tuple(names), metric=metric)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_chunk_tag(name: str) -> bool:
    """O, or a chunk prefix (IOB1/IOB2/IOE/IOBES/BILOU) and an entity type: B-PER, I-LOC, E-ORG, S-MISC, U-X."""
    prefix, dash, entity = name.partition("-")
    return name == "O" or (prefix in ("B", "I", "E", "S", "L", "U") and dash and bool(entity))


def _check_qa(rows: Dataset, spec: TaskSpec, source: str) -> Dataset:
    """SQuAD rows under SQuAD's column names: texts present, unique ids, answers as {text, answer_start} lists,
    and no unanswerable question unless the task is SQuAD v2."""
    _check_texts(rows, spec, source)
    _require_columns(rows, ("id",), source)
    rows = rows.rename_columns(
        {old: new for old, new in zip((*spec.text_fields, spec.label_field), QA_COLUMNS[1:]) if old != new}
    )
    answers = rows[0]["answers"]
    if not (isinstance(answers, dict) and {"text", "answer_start"} <= set(answers)):
        raise TaskError(
            f"{source}: column {spec.label_field} must hold {{text: [...], answer_start: [...]}} "
            f"as SQuAD does, got {answers!r}"
        )
    ids = rows["id"]
    if len(set(ids)) != len(ids):
        raise TaskError(f"{source}: {len(ids) - len(set(ids))} duplicate question id(s); ids must be unique")
    if "is_impossible" not in rows.column_names:
        rows = rows.map(lambda b: {"is_impossible": [not a["text"] for a in b["answers"]]}, batched=True)
    unanswerable = sum(rows["is_impossible"])
    if unanswerable and not spec.version_2_with_negative:
        raise TaskError(
            f"{source}: {unanswerable} question(s) have no answer (SQuAD v2.0 data); set "
            f"task.name: squad_v2 or task.version_2_with_negative: true"
        )
    return rows


# ---- features ---------------------------------------------------------------------------------


INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def tokenize_truncated(tokenizer, texts: list[list], max_length: int, **options) -> tuple[dict, list, list[bool]]:
    """texts (one list per text column) -> the tokenizer's INPUTS as lists per row, each row's word ids, and
    whether each row was longer than max_length tokens, truncated to it (longest first for pairs): only such rows
    pay for a second, truncating pass."""
    enc = tokenizer(*texts, return_token_type_ids=True, **options)
    inputs, word_ids = {key: enc[key] for key in INPUTS}, [enc.word_ids(i) for i in range(len(enc["input_ids"]))]
    truncated = [len(ids) > max_length for ids in enc["input_ids"]]
    long = [i for i, flag in enumerate(truncated) if flag]
    if long:
        cut = tokenizer(
            *[[t[i] for i in long] for t in texts],
            truncation=True,
            max_length=max_length,
            return_token_type_ids=True,
            **options,
        )
        for j, i in enumerate(long):
            for key in INPUTS:
                inputs[key][i] = cut[key][j]
            word_ids[i] = cut.word_ids(j)
    return inputs, word_ids, truncated


def _encode(dataset: Dataset, encode_batch) -> tuple[Dataset, int]:
    """dataset.map(encode_batch) and the number of truncated rows. The count is computed from a per-row flag
    column, not inside the map function, so a map result that `datasets` loads from its cache still reports it."""
    features = dataset.map(encode_batch, batched=True, remove_columns=dataset.column_names)
    truncated = sum(features["truncated"])
    return features.remove_columns("truncated"), truncated


def encode_classification(dataset: Dataset, tokenizer, spec: TaskSpec, max_length: int) -> tuple[Dataset, int]:
    """Rows -> input_ids, token_type_ids, attention_mask (not padded: pad per batch) and labels.

    Texts longer than max_length tokens are truncated (longest first for pairs); their number is returned
    for the log.
    """
    if spec.kind not in ("classification", "regression"):
        raise TaskError(
            f"{spec.kind} examples are encoded elsewhere: pipeline.finetune.squad.prepare_train_features (qa), "
            f"encode_token_classification"
        )

    def encode(batch):
        inputs, _, truncated = tokenize_truncated(tokenizer, [batch[f] for f in spec.text_fields], max_length)
        return {**inputs, "labels": batch[spec.label_field], "truncated": truncated}

    features, truncated = _encode(dataset, encode)
    dtype = "float32" if spec.kind == "regression" else "int64"
    return features.cast_column("labels", Value(dtype)), truncated


def encode_token_classification(dataset: Dataset, tokenizer, spec: TaskSpec, max_length: int) -> tuple[Dataset, int]:
    """Rows of words and tag ids -> model inputs (not padded) and a label per token, as transformers' token
    classification examples align them: a word's tag on its first sub-token, IGNORED_LABEL on its other sub-tokens
    and on the special tokens. Rows longer than max_length tokens are truncated (their last words then have no
    label: they are neither trained on nor scored); their number is returned for the log."""
    (words,) = spec.text_fields

    def encode(batch):
        inputs, word_ids, truncated = tokenize_truncated(
            tokenizer, [batch[words]], max_length, is_split_into_words=True
        )
        labels = []
        for row_words, tags in zip(word_ids, batch[spec.label_field]):
            firsts = [w is not None and w != before for w, before in zip(row_words, [None, *row_words])]
            labels.append([tags[w] if first else IGNORED_LABEL for w, first in zip(row_words, firsts)])
        return {**inputs, "labels": labels, "truncated": truncated}

    return _encode(dataset, encode)


# ---- metrics ----------------------------------------------------------------------------------


def _accuracy(pred, labels):
    return {"accuracy": accuracy_score(labels, pred)}


def _matthews(pred, labels):
    return {"matthews_correlation": matthews_corrcoef(labels, pred)}


def _f1_accuracy(pred, labels):
    return {"f1": f1_score(labels, pred), **_accuracy(pred, labels)}


def _accuracy_macro_f1(pred, labels):
    return {**_accuracy(pred, labels), "macro_f1": f1_score(labels, pred, average="macro")}


def _pearson_spearman(pred, labels):
    return {"pearson": pearsonr(pred, labels)[0], "spearman": spearmanr(pred, labels)[0]}


def _pearson_spearman_mse(pred, labels):
    return {**_pearson_spearman(pred, labels), "mse": mean_squared_error(labels, pred)}


def _token_accuracy(pred, labels):
    return {"accuracy": seqeval.accuracy_score(labels, pred)}


def _seqeval(pred, labels):
    """CoNLL's entity-level scores (conlleval's chunking, seqeval's default mode), F1 first; a score whose
    denominator is 0 (no entity predicted, or none in the data) is 0, without a warning per evaluation."""
    scores = (seqeval.f1_score, seqeval.precision_score, seqeval.recall_score)
    f1, precision, recall = (score(labels, pred, zero_division=0) for score in scores)
    return {"f1": f1, "precision": precision, "recall": recall, **_token_accuracy(pred, labels)}


METRICS = {
    "accuracy": _accuracy,  # SST-2, MNLI (matched and mismatched, one call per split), QNLI, RTE, WNLI
    "matthews": _matthews,  # CoLA
    "f1_accuracy": _f1_accuracy,  # MRPC, QQP: F1 of the positive class (1)
    "pearson_spearman": _pearson_spearman,  # STS-B
    "accuracy_macro_f1": _accuracy_macro_f1,  # any other classification task
    "pearson_spearman_mse": _pearson_spearman_mse,  # any other regression task
    # token classification, on lists of tag names per sentence: NER and other chunk tags (B-PER, I-PER, O)
    "seqeval": _seqeval,
    "token_accuracy": _token_accuracy,  # tags that are no chunks (POS)
}


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's metrics for one evaluation split. predictions: logits (N, num_labels) or class ids (N,);
    token classification: per feature, logits (T, num_labels) or tag ids (T,), with labels (T,) per feature."""
    if spec.kind == "qa":
        raise TaskError(
            "QA is scored on answer texts: use pipeline.finetune.squad.postprocess_predictions and squad_metrics"
        )
    if spec.kind == "token_classification":
        return token_metrics(spec, predictions, labels)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if spec.kind == "classification" and predictions.ndim == 2:
        predictions = predictions.argmax(-1)
    predictions = predictions.reshape(len(labels))
    return {name: float(value) for name, value in METRICS[spec.metric](predictions, labels).items()}


def token_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The tagging metrics of a split: each feature's tags, predicted and true, at its labelled tokens (a word's
    first sub-token), by name."""
    names = np.asarray(spec.label_names)
    predicted, true = [], []
    for pred, gold in zip(predictions, labels, strict=True):
        pred, gold = np.asarray(pred), np.asarray(gold)
        if pred.ndim == 2:
            pred = pred.argmax(-1)
        scored = gold != IGNORED_LABEL
        predicted.append(names[pred[scored]].tolist())
        true.append(names[gold[scored]].tolist())
    return {name: float(value) for name, value in METRICS[spec.metric](predicted, true).items()}
