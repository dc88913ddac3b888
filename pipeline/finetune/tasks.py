"""Fine-tuning tasks: what `earlybert finetune` reads, how labels become ids, and how it is scored.

A task is described by a `TaskConfig` (the `task` section of the fine-tuning config). `task.name`
picks one of GLUE's nine tasks or SQuAD and supplies the defaults (columns, label names, metric);
everything can also be set by hand for any other classification, regression or extractive QA data.
`load_task` reads the data (a `datasets` hub name, or local CSV/TSV/JSONL/Parquet and SQuAD JSON
files) and checks it all before any model exists: a missing column, a label that does not fit, an
empty split or an unreadable file is a `TaskError` that names the file and the fix, so a long run
never dies on its first evaluation. `encode_classification` turns rows into model inputs and
`compute_metrics` scores predictions with GLUE's official metrics (scikit-learn and scipy). SQuAD's
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
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

KINDS = ("classification", "regression", "qa")
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

    kind: str | None = None  # classification, regression or qa; None: from `name`, else classification
    name: str | None = None  # cola sst2 mrpc qqp stsb mnli qnli rte wnli squad squad_v2: defaults for the rest
    dataset: str | None = None  # hub dataset: "glue/sst2" = load_dataset("glue", "sst2"); "owner/name:" = no config
    train_files: list[str] = field(default_factory=list)  # local files: CSV, TSV, JSONL, Parquet; SQuAD JSON for qa
    # split name -> file(s), e.g. {validation_matched: [...]}; a list of files (or one file) is the split "validation"
    validation_files: dict | list[str] = field(default_factory=dict)
    text_fields: list[str] | None = None  # one or two text columns; default [text]; qa: [question, context] columns
    label_field: str | None = None  # default label (qa: answers)
    num_labels: int | None = None  # classification: None = as many as the labels show
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
    label_names: tuple[str, ...] = ()  # classification: label_names[i] is the name of class id i
    validation_splits: tuple[str, ...] = ("validation",)  # the hub splits evaluated, each scored on its own
    dataset: str | None = None  # the hub dataset used when no dataset and no files are given
    name: str | None = None

    @property
    def num_labels(self) -> int:
        """Width of the model's output: classes, 1 for regression, start and end logits for QA."""
        return {"classification": len(self.label_names), "regression": 1, "qa": 2}[self.kind]

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
GENERIC_METRICS = {"classification": "accuracy_macro_f1", "regression": "pearson_spearman_mse", "qa": "squad"}


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
    if cfg.text_fields is not None and len(cfg.text_fields) not in ((2,) if _kind(cfg) == "qa" else (1, 2)):
        raise TaskError(
            f"task.text_fields {cfg.text_fields}: give one column (single text) or two (a pair); "
            f"for qa two: the question's and the context's"
        )
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


def _kind(cfg: TaskConfig) -> str:
    return cfg.kind or (TASKS[cfg.name].kind if cfg.name else "classification")


def task_spec(cfg: TaskConfig) -> TaskSpec:
    """The task as configured, before the data is read (an unnamed classification task has no label names yet)."""
    kind = _kind(cfg)
    base = (
        TASKS[cfg.name]
        if cfg.name
        else TaskSpec(
            kind,
            ("question", "context") if kind == "qa" else ("text",),
            "answers" if kind == "qa" else "label",
            GENERIC_METRICS[kind],
        )
    )
    spec = replace(
        base, text_fields=tuple(cfg.text_fields or base.text_fields), label_field=cfg.label_field or base.label_field
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

    For QA the rows are SQuAD's (id, title, context, question, answers {text, answer_start}, is_impossible).
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
        ids = {name: i for i, name in enumerate(names)}
        for split, labels in values.items():
            unknown = sorted(set(labels) - set(ids))
            if unknown:
                raise TaskError(
                    f"{sources[split]}: label(s) {', '.join(unknown)} are not among {known} {', '.join(names)}"
                )
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


def _class_label_names(rows: Dataset, column: str) -> tuple[str, ...]:
    feature = rows.features[column]
    return tuple(feature.names) if isinstance(feature, ClassLabel) else ()


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


def encode_classification(dataset: Dataset, tokenizer, spec: TaskSpec, max_length: int) -> tuple[Dataset, int]:
    """Rows -> input_ids, token_type_ids, attention_mask (not padded: pad per batch) and labels.

    Texts longer than max_length tokens are truncated (longest first for pairs); their number is returned
    for the log. It is computed from a per-row flag column, not inside the map function, so a map result
    that `datasets` loads from its cache still reports it.
    """
    if spec.kind == "qa":
        raise TaskError("QA examples are windowed, not truncated: use pipeline.finetune.squad.prepare_train_features")
    keys = ("input_ids", "token_type_ids", "attention_mask")

    def encode(batch):
        texts = [batch[f] for f in spec.text_fields]
        enc = tokenizer(*texts, return_token_type_ids=True)
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_length]
        if long:  # only these pay for a second, truncating pass
            cut = tokenizer(
                *[[t[i] for i in long] for t in texts],
                truncation=True,
                max_length=max_length,
                return_token_type_ids=True,
            )
            for j, i in enumerate(long):
                for key in keys:
                    enc[key][i] = cut[key][j]
        flags = [False] * len(enc["input_ids"])
        for i in long:
            flags[i] = True
        return {**{key: enc[key] for key in keys}, "labels": batch[spec.label_field], "truncated": flags}

    features = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    truncated = sum(features["truncated"])
    features = features.remove_columns("truncated")
    dtype = "float32" if spec.kind == "regression" else "int64"
    return features.cast_column("labels", Value(dtype)), truncated


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


METRICS = {
    "accuracy": _accuracy,  # SST-2, MNLI (matched and mismatched, one call per split), QNLI, RTE, WNLI
    "matthews": _matthews,  # CoLA
    "f1_accuracy": _f1_accuracy,  # MRPC, QQP: F1 of the positive class (1)
    "pearson_spearman": _pearson_spearman,  # STS-B
    "accuracy_macro_f1": _accuracy_macro_f1,  # any other classification task
    "pearson_spearman_mse": _pearson_spearman_mse,  # any other regression task
}


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's metrics for one evaluation split. predictions: logits (N, num_labels) or class ids (N,)."""
    if spec.kind == "qa":
        raise TaskError(
            "QA is scored on answer texts: use pipeline.finetune.squad.postprocess_predictions and squad_metrics"
        )
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if spec.kind == "classification" and predictions.ndim == 2:
        predictions = predictions.argmax(-1)
    predictions = predictions.reshape(len(labels))
    return {name: float(value) for name, value in METRICS[spec.metric](predictions, labels).items()}
