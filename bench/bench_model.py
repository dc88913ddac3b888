"""One training step (forward, backward, AdamW) of EarlyBertForPreTraining against transformers'
BertForPreTraining with SDPA attention, and of EarlyBERT with each training-efficiency option on
(unpad, activation_checkpointing, fused_qkv: EarlyBertConfig fields; torch.compile): same config,
same weights, same padded batch, interleaved repetitions, medians. `--memory` adds the peak host
memory (VmHWM) of one step with each option, each in its own process (bert-large, seq 512, batch 2).

    python -m bench.bench_model                       # CPU default: bert-small, seq 128, batch 16, fp32
    python -m bench.bench_model --memory              # and the bert-large seq-512 peak memory per option
    python -m bench.bench_model --preset bert-large --batch 64 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys

import torch
import transformers
from transformers import BertConfig, BertForPreTraining

from bench.common import median_time, write_results
from pipeline import EarlyBertConfig, EarlyBertForPreTraining

transformers.logging.set_verbosity_error()


# Share of padding in a micro-batch of NSP shards, as measured on the demo corpus at seq 128 (12-14%);
# seq-512 shards pad more (the benchmarks take --pad-fraction).
PAD_FRACTION = 0.13
# name -> EarlyBertConfig fields of each option measured against the plain model ("compile" is torch.compile).
OPTIONS = {
    "unpad": {"unpad": True},
    "activation_checkpointing": {"activation_checkpointing": True},
    "fused_qkv": {"fused_qkv": True},
    "compile": {},
}


def make_batch(
    config: EarlyBertConfig,
    batch: int,
    seq_len: int,
    device: str,
    seed: int = 0,
    pad_fraction: float = 0.0,
    mask_prob: float = 0.15,
) -> dict:
    """Random tokens, mask_prob of the real ones labelled, right-padded: row lengths uniform in [(1 - 2 f) T, T]
    for pad fraction f."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq_len), generator=g)
    shortest = round(seq_len * (1 - 2 * pad_fraction))
    lengths = torch.randint(shortest, seq_len + 1, (batch,), generator=g)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    labels = torch.full_like(ids, -100)
    masked = (torch.rand(batch, seq_len, generator=g) < mask_prob) & mask.bool()
    labels[masked] = ids[masked]
    types = torch.zeros_like(ids)
    types[:, seq_len // 2 :] = 1
    nsp = torch.randint(0, 2, (batch,), generator=g)
    tensors = dict(
        input_ids=ids * mask, attention_mask=mask, token_type_ids=types * mask, labels=labels, next_sentence_label=nsp
    )
    return {k: v.to(device) for k, v in tensors.items()}


def with_option(config: EarlyBertConfig, option: str | None) -> EarlyBertConfig:
    return EarlyBertConfig(**{**config.to_dict(), **OPTIONS.get(option, {})})


def peak_memory_of_step(preset: str, seq_len: int, batch: int, option: str | None) -> dict:
    """Host memory of one training step with `option` (this process: run it in a fresh one). The second step is
    measured (the first creates the Adam moments): the peak RSS (VmHWM, reset before it) and its excess over
    the RSS before the step, i.e. the activations and temporaries."""
    torch.manual_seed(0)
    config = with_option(EarlyBertConfig.from_preset(preset, vocab_size=30522), option)
    model = EarlyBertForPreTraining(config).train()
    if option == "compile":
        model.compile()
    step = train_step_fn(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-4),
        make_batch(config, batch, seq_len, "cpu", pad_fraction=PAD_FRACTION),
        torch.float32,
    )
    step()
    before, peak = peak_rss_mb(step)
    return {"option": option or "none", "rss_before_mb": before, "peak_rss_mb": peak, "step_excess_mb": peak - before}


def peak_rss_mb(fn) -> tuple[float, float]:
    """(RSS before fn(), peak RSS during it) in MB. Freed blocks are handed back first (malloc_trim), so the RSS
    before is what is held, and the peak (VmHWM) is reset to it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return before / 1024, rss_kb("VmHWM") / 1024


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_table(preset: str, seq_len: int, batch: int) -> list[dict]:
    """peak_memory_of_step for no option and each option, each in its own process."""
    rows = []
    for option in (None, *OPTIONS):
        code = (
            f"import json; from bench.bench_model import peak_memory_of_step; "
            f"print(json.dumps(peak_memory_of_step({preset!r}, {seq_len}, {batch}, {option!r})))"
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def train_step_fn(model, optimizer, batch: dict, dtype: torch.dtype):
    device_type = "cuda" if torch.cuda.is_available() else "cpu"

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="bert-large" if on_gpu else "bert-small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64 if on_gpu else 16)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if on_gpu else "fp32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps-per-rep", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pad-fraction", type=float, default=PAD_FRACTION, help="share of padding in the batch")
    parser.add_argument("--memory", action="store_true", help="also the peak memory per option (bert-large, seq 512)")
    args = parser.parse_args(argv)
    device = "cuda" if on_gpu else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    torch.manual_seed(0)
    config = EarlyBertConfig.from_preset(
        args.preset, vocab_size=30522, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    hf_cfg = BertConfig(
        **{k: v for k, v in config.to_dict().items() if k in BertConfig().to_dict()}, attn_implementation="sdpa"
    )
    hf = BertForPreTraining(hf_cfg).to(device).train()
    ours = EarlyBertForPreTraining(config).to(device).train()
    ours.load_state_dict(hf.state_dict(), strict=False)  # same weights; the gates stay at 1.0
    models = {"earlybert": ours, "hf_bert": hf}
    for option in OPTIONS:
        models[f"earlybert+{option}"] = model = EarlyBertForPreTraining(with_option(config, option)).to(device).train()
        model.load_state_dict(ours.state_dict())
        if option == "compile":
            model.compile()
    batch = make_batch(config, args.batch, args.seq_len, device, pad_fraction=args.pad_fraction)
    real_tokens = int(batch["attention_mask"].sum())

    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
        step = train_step_fn(model, opt, batch, dtype)
        steps[name] = lambda step=step: [step() for _ in range(args.steps_per_rep)]
        for _ in range(args.warmup):
            step()

    samples = {name: [] for name in steps}
    for _ in range(args.reps):  # interleaved, so drift on a noisy machine hits all alike
        for name, fn in steps.items():
            t, _ = median_time(fn, 1)
            samples[name].append(t / args.steps_per_rep)
    med = {name: statistics.median(v) for name, v in samples.items()}
    ratio = med["earlybert"] / med["hf_bert"]
    memory = memory_table("bert-large", 512, 2) if args.memory else []
    results = dict(
        preset=args.preset,
        seq_len=args.seq_len,
        batch=args.batch,
        dtype=args.dtype,
        reps=args.reps,
        pad_fraction=1 - real_tokens / batch["attention_mask"].numel(),
        step_seconds=samples,
        median_step_seconds=med,
        ratio_earlybert_over_hf=ratio,
        option_step_ratio={n: med[n] / med["earlybert"] for n in med},
        sequences_per_second={n: args.batch / t for n, t in med.items()},
        real_tokens_per_second={n: real_tokens / t for n, t in med.items()},
        peak_memory_bert_large_seq512_batch2=memory,
    )
    rows = [[n, f"{med[n] * 1e3:.1f}", f"{med[n] / med['earlybert']:.3f}", f"{args.batch / med[n]:.1f}"] for n in med]
    rows.append(["ratio (ours / HF)", f"{ratio:.3f}", "", ""])
    rows += [
        [f"memory: {m['option']}", "", "", "", f"{m['peak_rss_mb']:.0f}", f"{m['step_excess_mb']:.0f}"] for m in memory
    ]
    header = ["model", "median step (ms)", "step / earlybert", "sequences/s"]
    header += ["peak RSS (MB)", "step excess (MB)"] if memory else []
    path = write_results(
        "model_step",
        results,
        header,
        [row[: len(header)] for row in rows],
        notes=f"{args.preset}, seq {args.seq_len}, batch {args.batch} ({results['pad_fraction']:.1%} padding), "
        f"{args.dtype}, forward+backward+AdamW, {args.reps} interleaved repetitions of {args.steps_per_rep} steps. "
        "Target: ratio <= 1.0. Memory rows: bert-large, seq 512, batch 2, fp32, one step in a fresh process per "
        "option; step excess = peak RSS of the step - RSS before it.",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
