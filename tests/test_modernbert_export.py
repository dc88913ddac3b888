"""The downstream tools on the ModernBERT family: `earlybert export` (transformers' own ModernBert* classes for a
uniform structure, our remote code for a pruned one, the tokenizer without segments), `earlybert report` and
`earlybert eval`.

In-memory models go through export_model (no run needed): modernbert-tiny on the README tokenizer of
tests/test_hf_export.py, gates randomized (test_modernbert.py's helper) so that a wrong fold shows, a window of 8
tokens and another local rotary theta so that a dropped field shows. The run tests share one 2-rank EarlyBERT run
of modernbert-tiny (slow): its checkpoint before the draw (uniform, gated) and its last one (pruned)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    ModernBertForMaskedLM,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
)

import test_hf_export
import test_modernbert_runs
from pipeline.earlybert.detector import Masks
from pipeline.earlybert.pruner import prune_model
from pipeline.families import MODERNBERT
from pipeline.modernbert import (
    EarlyModernBertForMaskedLM,
    EarlyModernBertForQuestionAnswering,
    EarlyModernBertForSequenceClassification,
    EarlyModernBertForTokenClassification,
)
from pipeline.run.rundir import RunDir
from pipeline.tools.export import ExportError, auto_map, export_model, load_run_model
from pipeline.tools.report import _dense_structure, write_report
from runs import BIN, REPO, deepspeed, finish, run_env, ticket
from test_hf_export import LABELS, README, vocab
from test_modernbert import KEPT_HEADS, KEPT_NEURONS, batch, close, spread_gates, tiny
from test_modernbert_runs import SEARCH
from test_report import make_run

transformers.logging.set_verbosity_error()
# fixtures of other test files: the README WordPiece tokenizer, the ModernBERT run config
tokenizer_file = test_hf_export.tokenizer_file
mb_config = test_modernbert_runs.mb_config
MAX_POSITIONS = 48
# the README tokenizer's special tokens: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
TOKEN_IDS = dict(pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)


def config(tokenizer_file, **fields):
    return tiny(vocab_size=vocab(tokenizer_file), max_position_embeddings=MAX_POSITIONS, **TOKEN_IDS, **fields)


def gated(cls, tokenizer_file, seed: int, **fields):
    """A model of `cls` with ModernBERT's initialisation and random gates (the export folds them): they move its
    logits by 3e-3 or more, and the fp32 rounding of the fold and of transformers' other order of operations stays
    near 1e-7 (test_modernbert's larger random weights give logits of 7, and rounding of 1e-5)."""
    torch.manual_seed(seed)
    model = cls(config(tokenizer_file, **fields)).eval()
    spread_gates(model, seed)
    return model


def pruned(model):
    """test_modernbert's ticket: heads [3, 1, 4, 2], GLU widths [48, 4, 96, 60]; gates kept (the export folds them)."""
    masks = Masks(
        heads=[torch.isin(torch.arange(4), torch.tensor(kept)) for kept in KEPT_HEADS],
        ffn=[torch.isin(torch.arange(96), torch.tensor(kept)) for kept in KEPT_NEURONS],
    )
    small, _ = prune_model(model, masks, fold_gates=False)
    assert small.config.num_heads_per_layer == [3, 1, 4, 2] and small.config.use_gates
    return small.eval()


def assert_same(ours, theirs, names, mask) -> None:
    """Outputs `names` equal within 1e-5 (absolute and relative: test_modernbert's `close`) at the real tokens
    (outputs at padding are unspecified: ours unpads)."""
    for name in names:
        a, b = getattr(ours, name), getattr(theirs, name)
        close(a, b, mask if a.dim() > 1 and a.shape[:2] == mask.shape else None)


def plain_python(check: str, cwd: Path) -> str:
    """Run `check` in a Python whose sys.path lacks this project (no PYTHONPATH, another directory): what a user of
    the exported directory has."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    guard = (  # the virtual environment holds the project as an editable install: its finder goes too
        "import importlib.util, sys;"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')];"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p];"
        "assert importlib.util.find_spec('pipeline') is None, 'the project is importable';"
    )
    proc = subprocess.run([sys.executable, "-c", guard + check], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_uniform_masked_lm_exports_as_transformers_modernbert(tokenizer_file, tmp_path):
    model = gated(EarlyModernBertForMaskedLM, tokenizer_file, seed=1, local_attention=8, local_rope_theta=500.0)
    info = export_model(model, tmp_path / "export", tokenizer_file)
    assert info["format"] == "bert" and info["class"] == "ModernBertForMaskedLM"
    exported = ModernBertForMaskedLM.from_pretrained(tmp_path / "export").eval()
    c = exported.config
    assert (c.num_attention_heads, c.intermediate_size, c.local_attention) == (4, 96, 8)
    assert c.layer_types == model.config.layer_types and c.vocab_size == model.config.vocab_size
    assert {t: p["rope_theta"] for t, p in c.rope_parameters.items()} == {
        "full_attention": 160000.0,
        "sliding_attention": 500.0,
    }
    assert (c.pad_token_id, c.cls_token_id, c.sep_token_id, c.bos_token_id, c.eos_token_id) == (0, 2, 3, 2, 3)
    ids, mask, labels = batch(seed=1)  # padded rows, one on both sides; 24 tokens: the window of 8 matters
    with torch.no_grad():
        ours, theirs = model(ids, mask, labels=labels), exported(ids, attention_mask=mask, labels=labels)
    assert_same(ours, theirs, ["logits"], mask)
    assert abs(float(ours.mlm_loss) - float(theirs.loss)) <= 1e-5

    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tok.model_input_names == ["input_ids", "attention_mask"] and tok.model_max_length == MAX_POSITIONS
    encoded = tok("the model is [MASK] to the hub.")
    assert "token_type_ids" not in encoded and encoded["input_ids"][0] == tok.cls_token_id == 2
    assert (tok.pad_token_id, tok.mask_token, tok.sep_token_id) == (0, "[MASK]", 3)


@pytest.fixture(scope="module")
def pruned_export(tokenizer_file, tmp_path_factory):
    """(in-memory pruned EarlyModernBertForMaskedLM with gates, its export directory)"""
    model = pruned(gated(EarlyModernBertForMaskedLM, tokenizer_file, seed=2, local_attention=8))
    out = tmp_path_factory.mktemp("export") / "pruned"
    info = export_model(model, out, tokenizer_file)
    assert info["format"] == "earlybert" and info["class"] == "EarlyModernBertForMaskedLM"
    assert info["heads_per_layer"] == [3, 1, 4, 2] and info["ffn_per_layer"] == [48, 4, 96, 60]
    return model, out


def test_pruned_masked_lm_exports_as_remote_code_that_computes_the_same(pruned_export, monkeypatch):
    model, out = pruned_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "modernbert" and config["auto_map"] == auto_map(MODERNBERT)
    assert set(config["auto_map"]) == {"AutoConfig", *MODERNBERT.classes} and len(config["auto_map"]) == 7
    assert config["auto_map"]["AutoConfig"] == "modeling_earlymodernbert.EarlyModernBertConfig"
    assert (out / "modeling_earlymodernbert.py").read_text() == (REPO / "pipeline" / "modernbert.py").read_text()
    exported = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(exported).__name__ == "EarlyModernBertForMaskedLM" and not exported.config.use_gates
    assert exported.config.num_heads_per_layer == [3, 1, 4, 2] and exported.config.local_attention == 8
    ids, mask, labels = batch(seed=2)
    with torch.no_grad():
        ours, theirs = model(ids, mask, labels=labels), exported(ids, attention_mask=mask, labels=labels)
    assert_same(ours, theirs, ["logits", "mlm_loss"], mask)
    # Without trust_remote_code the config reads as transformers' ModernBERT (the tokenizer too, without asking);
    # the pruned weights do not fit its uniform shapes and loading fails.
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    assert type(AutoConfig.from_pretrained(out)).__name__ == "ModernBertConfig"
    assert AutoTokenizer.from_pretrained(out).mask_token == "[MASK]" and not prompts
    with pytest.raises(Exception, match="size|shape"):
        AutoModelForMaskedLM.from_pretrained(out)


def test_pruned_export_loads_where_the_project_is_not_installed(pruned_export, tmp_path):
    model, out = pruned_export
    check = (
        "import torch; from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification;"
        f"m = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval();"
        f"ids = torch.tensor([[2, 7, 9, 11, 3]]);"
        "print(m(ids).logits[0, 1, :3].tolist());"
        f"c = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True, num_labels=3);"
        "print(type(m).__name__, type(c).__name__, c.config.intermediate_size_per_layer)"
    )
    lines = plain_python(check, tmp_path).splitlines()
    assert lines[-1] == "EarlyModernBertForMaskedLM EarlyModernBertForSequenceClassification [48, 4, 96, 60]"
    with torch.no_grad():
        want = model(torch.tensor([[2, 7, 9, 11, 3]])).logits[0, 1, :3]
    assert torch.allclose(torch.tensor(json.loads(lines[-2])), want, atol=1e-5)


HEADS = [
    (EarlyModernBertForSequenceClassification, ModernBertForSequenceClassification, ("logits",)),
    (EarlyModernBertForTokenClassification, ModernBertForTokenClassification, ("logits",)),
    (EarlyModernBertForQuestionAnswering, ModernBertForQuestionAnswering, ("start_logits", "end_logits")),
]


@pytest.mark.parametrize("our_class, hf_class, names", HEADS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("prune", [False, True], ids=["uniform", "pruned"])
def test_task_head_exports_load_through_their_auto_class(tokenizer_file, tmp_path, our_class, hf_class, names, prune):
    """A fine-tuned head exports as transformers' class (uniform) or ours (pruned), reloaded through
    AutoModelFor<Task> with its labels, pooling and outputs."""
    labels = {} if our_class is EarlyModernBertForQuestionAnswering else dict(num_labels=3, id2label=LABELS)
    fields = dict(classifier_pooling="mean") if our_class is EarlyModernBertForSequenceClassification else {}
    model = gated(our_class, tokenizer_file, seed=3, local_attention=8, **labels, **fields)
    model = pruned(model) if prune else model
    info = export_model(model, tmp_path / "export", tokenizer_file)
    auto = next(a for a, cls in MODERNBERT.classes.items() if cls is our_class and a != "AutoModelForPreTraining")
    exported = getattr(transformers, auto).from_pretrained(tmp_path / "export", trust_remote_code=prune).eval()
    assert type(exported) is not our_class  # loaded from the export's own file, not this project's
    assert type(exported).__name__ == info["class"] == (our_class.__name__ if prune else hf_class.__name__)
    assert exported.config.id2label == model.config.id2label and exported.config.label2id == model.config.label2id
    assert exported.config.classifier_pooling == model.config.classifier_pooling
    ids, mask, _ = batch(seed=3, left_padding=False)  # transformers' CLS pooling reads column 0
    with torch.no_grad():
        assert_same(model(ids, mask), exported(ids, attention_mask=mask), names, mask)


def test_tokenizer_specials_are_the_tokenizers_own(tmp_path):
    """A BPE tokenizer naming its specials <s>, </s>, <pad>, <mask>, <unk> (as RoBERTa's; `earlybert prep` accepts
    them): the export's tokenizer_config names them so."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        README.read_text().splitlines(),
        trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    path = tmp_path / "bpe.json"
    tok.save(str(path))
    model = EarlyModernBertForMaskedLM(
        tiny(vocab_size=tok.get_vocab_size(), pad_token_id=1, cls_token_id=0, sep_token_id=2)
    )
    export_model(model, tmp_path / "export", path)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    named = (loaded.cls_token, loaded.sep_token, loaded.pad_token, loaded.mask_token, loaded.unk_token)
    assert named == ("<s>", "</s>", "<pad>", "<mask>", "<unk>") and loaded.pad_token_id == 1
    encoded = loaded("a model <mask> here")
    assert encoded["input_ids"][0] == 0 and loaded.mask_token_id in encoded["input_ids"]


@pytest.mark.parametrize(
    "model, dense",
    [
        ({"family": "modernbert", "preset": "modernbert-mini", "overrides": {"intermediate_size": 512}}, (4, 512)),
        ({"family": "modernbert"}, (4, 96)),  # the family's default preset: modernbert-tiny
    ],
)
def test_report_of_a_run_without_checkpoints_takes_the_dense_reference_from_its_familys_preset(tmp_path, model, dense):
    run = make_run(tmp_path / "run", model)
    preset = model.get("preset", "modernbert-tiny")
    assert _dense_structure(RunDir(run)) == (*dense, f"preset {preset}")
    assert (
        f"dense: {dense[0]} heads and {dense[1]} FFN neurons per layer (preset {preset})"
        in write_report([run]).read_text()
    )


def test_a_tokenizer_without_the_special_tokens_is_refused_by_name(tokenizer_file, tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "plain.json"))
    model = EarlyModernBertForMaskedLM(config(tokenizer_file))
    with pytest.raises(ExportError, match=r"plain.json: no \[CLS\] or <s> token.*pass --tokenizer"):
        export_model(model, tmp_path / "export", tmp_path / "plain.json")
    assert not (tmp_path / "export").exists()


# ---- a ModernBERT pre-training run ---------------------------------------------------------------------------------

PRE_DRAW = "step_00000003"  # checkpoints every 3 steps, all kept: step 3 is before the draw (searched from step 4)


@pytest.fixture(scope="module")
def mb_run(mb_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mb_export_run") / "run"
    code, out = finish(deepspeed(mb_config, run_dir, *SEARCH, "checkpoint.keep=10"))
    assert code == 0, out
    assert ticket(run_dir)["draw_step"] > 3
    return run_dir


def earlybert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "earlybert"), *map(str, args)], env=run_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("tag, fmt", [(PRE_DRAW, "bert"), (None, "earlybert")], ids=["before-draw", "pruned"])
def test_export_of_a_modernbert_run(mb_run, tmp_path, tag, fmt):
    out = tmp_path / "export"
    proc = earlybert("export", mb_run, "--output", out, *(["--tag", tag] if tag else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout[proc.stdout.index("{") :])
    ours, _ = load_run_model(mb_run, tag)
    assert info["format"] == fmt and type(ours) is EarlyModernBertForMaskedLM
    assert ours.config.is_uniform == (fmt == "bert") and ours.config.use_gates == (fmt == "bert")  # folded at the draw
    exported = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=fmt == "earlybert").eval()
    assert type(exported).__name__ == ("ModernBertForMaskedLM" if fmt == "bert" else "EarlyModernBertForMaskedLM")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, ours.config.vocab_size, (2, 40), generator=g)  # 40 tokens: past the run's window of 16
    mask = torch.ones_like(ids)
    mask[1, 27:] = 0
    with torch.no_grad():
        assert_same(ours(ids, mask), exported(ids, attention_mask=mask), ["logits"], mask)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == ours.config.vocab_size and tok.mask_token == "[MASK]"
    assert "token_type_ids" not in tok("hello world") and tok("hello world")["input_ids"][0] == tok.cls_token_id


@pytest.mark.slow
def test_report_of_a_modernbert_run(mb_run):
    proc = earlybert("report", mb_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (mb_run / "report" / "report.md").read_text()
    drawn = ticket(mb_run)
    assert f"drawn at step {drawn['draw_step']}" in md and f"heads per layer {drawn['heads_per_layer']}" in md
    assert "dense: 4 heads and 96 FFN neurons per layer" in md  # modernbert-tiny's, from its architecture.json
    for figure in ("loss", "throughput", "distances", "structure"):
        assert (mb_run / "report" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_of_a_modernbert_run(mb_run, shards):
    proc = earlybert("eval", mb_run, "--shards", shards / "seq64", "--max-sequences", 64, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["sequences"] == 64 and result["mask_prob"] == 0.3  # the run's masking rate
    assert result["masked_tokens"] > 0.25 * 64 * 40 and 0 < result["mlm_loss"] < 10 and 0 <= result["mlm_acc"] <= 1


@pytest.mark.parametrize("value", ["0", "1.5", "most"])
def test_eval_refuses_a_mask_prob_outside_0_1(tmp_path, capsys, value):
    from pipeline.tools.masked_lm_eval import main as eval_main

    with pytest.raises(SystemExit) as exit_:
        eval_main([str(tmp_path), "--shards", str(tmp_path), "--mask-prob", value])
    assert (
        exit_.value.code == 2 and f"expected a fraction in (0, 1), e.g. 0.15, got {value!r}" in capsys.readouterr().err
    )
