"""One training step (forward, backward, AdamW) of EarlyBertForPreTraining against transformers'
BertForPreTraining with SDPA attention: same config, same weights, same batch, interleaved
repetitions, medians.

    python -m bench.bench_model                       # CPU default: bert-small, seq 128, batch 16, fp32
    python -m bench.bench_model --preset bert-large --batch 64 --dtype bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import statistics

import torch
import transformers
from transformers import BertConfig, BertForPreTraining

from bench.common import median_time, write_results
from pipeline import EarlyBertConfig, EarlyBertForPreTraining

transformers.logging.set_verbosity_error()


def make_batch(config: EarlyBertConfig, batch: int, seq_len: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(batch, seq_len, generator=g) < 0.15
    labels[masked] = ids[masked]
    types = torch.zeros_like(ids)
    types[:, seq_len // 2 :] = 1
    nsp = torch.randint(0, 2, (batch,), generator=g)
    tensors = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types, labels=labels, next_sentence_label=nsp)
    return {k: v.to(device) for k, v in tensors.items()}


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
    args = parser.parse_args(argv)
    device = "cuda" if on_gpu else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    torch.manual_seed(0)
    config = EarlyBertConfig.from_preset(args.preset, vocab_size=30522, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    hf_cfg = BertConfig(**{k: v for k, v in config.to_dict().items() if k in BertConfig().to_dict()}, attn_implementation="sdpa")
    hf = BertForPreTraining(hf_cfg).to(device).train()
    ours = EarlyBertForPreTraining(config).to(device).train()
    ours.load_state_dict(hf.state_dict(), strict=False)  # same weights; the gates stay at 1.0
    batch = make_batch(config, args.batch, args.seq_len, device)

    steps = {}
    for name, model in (("earlybert", ours), ("hf_bert", hf)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
        step = train_step_fn(model, opt, batch, dtype)
        steps[name] = lambda step=step: [step() for _ in range(args.steps_per_rep)]
        for _ in range(args.warmup):
            step()

    samples = {name: [] for name in steps}
    for _ in range(args.reps):  # interleaved, so drift on a noisy machine hits both alike
        for name, fn in steps.items():
            t, _ = median_time(fn, 1)
            samples[name].append(t / args.steps_per_rep)
    med = {name: statistics.median(v) for name, v in samples.items()}
    ratio = med["earlybert"] / med["hf_bert"]
    results = dict(
        preset=args.preset, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype, reps=args.reps,
        step_seconds=samples, median_step_seconds=med, ratio_earlybert_over_hf=ratio,
        sequences_per_second={n: args.batch / t for n, t in med.items()},
    )
    rows = [[n, f"{med[n] * 1e3:.1f}", f"{args.batch / med[n]:.1f}"] for n in med]
    rows.append(["ratio (ours / HF)", f"{ratio:.3f}", ""])
    path = write_results(
        "model_step", results, ["model", "median step (ms)", "sequences/s"], rows,
        notes=f"{args.preset}, seq {args.seq_len}, batch {args.batch}, {args.dtype}, forward+backward+AdamW, "
        f"{args.reps} interleaved repetitions of {args.steps_per_rep} steps. Target: ratio <= 1.0.",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
