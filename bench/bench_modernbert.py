"""The gated ModernBERT (pipeline/modernbert.py) on this machine, side by side in one run:

(a) our training step (forward, backward, AdamW; unpadded, the MLM head on the masked positions only, the gates'
    L1 term as the search adds it) against transformers' ModernBertForMaskedLM step (SDPA attention,
    sparse_prediction: its own head on the masked positions only) at the same shape, weights and batch;
    target: ours / theirs <= 1.0;
(b) the step of the model pruned as EarlyBERT's default ticket (1/3 of the heads of every layer, 40% of the GLU
    neurons over all layers, gates folded) against the dense step without gates (dense mode), set against the ratio
    of their FLOPs; target: speed-up >= 90% of dense FLOPs / pruned FLOPs. Also the speed-up a run sees at the draw,
    from the gated step of the search.

The variants' steps are interleaved (one step of each per repetition, the order rotated every repetition) so that
the other work on the machine falls on all of them alike. Two clocks: this process's CPU time, the step's own work
(with one thread, the default, whatever else runs), the headline; and the wall time, waits for a busy core included.
Per clock: each variant's median and quartiles, and each ratio of medians with the quartiles of the ratios paired
within a repetition, which say how far the medians can be trusted. FLOPs are counted on one forward and backward of
each model on the benchmark's batch by torch's FlopCounterMode (it counts every query-key pair of an SDPA call, a
sliding-window layer's masked ones too). The from-scratch EarlyBERT-vs-dense pre-training comparison is not
here: it needs ModernBERT in `earlybert train`.

    python -m bench.bench_modernbert                    # 6 layers, hidden 384, seq 128 and 512, batch 8, fp32
    python -m bench.bench_modernbert --quick            # seq 128, 5 repetitions (make bench): modernbert_quick.*
    python -m bench.bench_modernbert --dtype bf16 --seq-lens 512 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import ModernBertConfig, ModernBertForMaskedLM

from bench.bench_model import make_batch, train_step_fn
from bench.common import write_results
from pipeline.earlybert.detector import DetectorConfig, masks_from_gates
from pipeline.model import parameter_count
from pipeline.modernbert import EarlyModernBertConfig, EarlyModernBertForMaskedLM, modernbert_config_dict, prune_model

transformers.logging.set_verbosity_error()

# modernbert-mini's 6 layers (global attention in layers 0 and 3, a 128-token window in the others) at ModernBERT's
# head size (64) and GLU width (1.5x hidden), and its tokenizer's 50368-token vocabulary; 6 heads, so that 1/3 of
# them is a whole number of heads.
SHAPE = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, intermediate_size=576)
# Padding share of micro-batches of `earlybert prep --no-nsp` shards (sentences packed up to the length; a document's
# last sequence is padded), measured on 3 MB of the local corpus: 16% at seq 128, 8% at seq 512.
PAD_FRACTION = {128: 0.16, 512: 0.08}
MASK_PROB = 0.3  # ModernBERT's masking rate
GATE_LAMBDAS = (1e-4, 1e-4)  # the search's L1 term (earlybert.lambda_heads, lambda_ffn)


def models(shape: dict, seed: int = 0) -> dict[str, torch.nn.Module]:
    """transformers' ModernBertForMaskedLM; ours on its weights, with gates spread as a search leaves them, and
    without gates (dense mode; a ticket once its gates are folded); and ours pruned to the ticket EarlyBERT's default
    detector draws from those gates."""
    torch.manual_seed(seed)
    hf_config = ModernBertConfig(**shape, sparse_prediction=True, attn_implementation="sdpa")
    theirs = ModernBertForMaskedLM(hf_config).train()
    config = EarlyModernBertConfig.from_dict(modernbert_config_dict(hf_config.to_dict()))
    plain = EarlyModernBertForMaskedLM(EarlyModernBertConfig.from_dict({**config.to_dict(), "use_gates": False}))
    plain.load_state_dict(theirs.state_dict())
    ours = EarlyModernBertForMaskedLM(config)
    missing = ours.load_state_dict(theirs.state_dict(), strict=False).missing_keys
    assert all(k.endswith(("head_gates", "ffn_gates")) for k in missing), missing
    with torch.no_grad():
        for gate in ours.head_gates() + ours.ffn_gates():
            gate.copy_(1.0 + 0.3 * torch.randn(gate.shape))
    masks = masks_from_gates(ours.head_gates(), ours.ffn_gates(), DetectorConfig())
    pruned, _ = prune_model(ours, masks.kept_heads(), masks.kept_neurons(), fold_gates=True)
    return {"hf": theirs, "ours": ours.train(), "ours_no_gates": plain.train(), "ours_pruned": pruned.train()}


def inputs_of(name: str, batch: dict) -> dict:
    """What each model's training step is called with: the same tensors, and ours as the training loop calls it."""
    tensors = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if name == "hf":
        return tensors
    return {**tensors, "masked_logits_only": True, **({"gate_lambdas": GATE_LAMBDAS} if name == "ours" else {})}


def step_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one forward and backward, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3


# name -> (numerator, denominator) variants of the ratios reported. The pruned speed-up of the structure: the dense
# model without gates against the pruned one (folded: no gates either); at the draw a run goes from the gated step.
RATIOS = {
    "ours / transformers": ("ours", "hf"),
    "ours without gates / transformers": ("ours_no_gates", "hf"),
    "pruned speed-up (no gates / pruned)": ("ours_no_gates", "ours_pruned"),
    "speed-up at the draw (gated / pruned)": ("ours", "ours_pruned"),
}
CLOCKS = ("cpu", "wall")  # this process's CPU time (one thread: the step's own work), and wall time


def measure(seq_len: int, batch_size: int, reps: int, dtype: torch.dtype, shape: dict = SHAPE) -> dict:
    """Every variant's step at one sequence length, interleaved; per clock the medians and quartiles of the steps,
    the ratios of the medians and the quartiles of the paired (same repetition) ratios; FLOPs."""
    variants = models(shape)
    config = variants["ours"].config
    pad_fraction = PAD_FRACTION.get(seq_len, 0.1)
    batch = make_batch(config, batch_size, seq_len, "cpu", pad_fraction=pad_fraction, mask_prob=MASK_PROB)
    flops = {name: step_flops(model, inputs_of(name, batch)) for name, model in variants.items()}
    steps = {}
    for name, model in variants.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = train_step_fn(model, optimizer, inputs_of(name, batch), dtype)
        steps[name](), steps[name]()  # warm-up: the first steps allocate Adam's moments and the allocator's pools
    names = list(steps)
    samples = {clock: {n: [] for n in names} for clock in CLOCKS}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            samples["wall"][name].append(time.perf_counter() - start_wall)
            samples["cpu"][name].append(time.process_time() - start_cpu)
    clocks = {}
    for clock, steps_s in samples.items():
        median = {n: statistics.median(v) for n, v in steps_s.items()}
        clocks[clock] = dict(
            steps_s=steps_s,
            median_s=median,
            quartiles_s={n: quartiles(v) for n, v in steps_s.items()},
            ratios={k: median[a] / median[b] for k, (a, b) in RATIOS.items()},
            paired_quartiles={
                k: quartiles([x / y for x, y in zip(steps_s[a], steps_s[b])]) for k, (a, b) in RATIOS.items()
            },
        )
    ideal = flops["ours_no_gates"] / flops["ours_pruned"]
    pruned_config = variants["ours_pruned"].config
    return dict(
        seq_len=seq_len,
        batch=batch_size,
        pad_fraction=1 - float(batch["attention_mask"].float().mean()),
        masked_tokens=int((batch["labels"] != -100).sum()),
        clocks=clocks,
        flops=flops,
        flops_speedup=ideal,
        speedup_share_of_flops={c: clocks[c]["ratios"]["pruned speed-up (no gates / pruned)"] / ideal for c in CLOCKS},
        parameters={n: parameter_count(m) for n, m in variants.items()},
        pruned_heads_per_layer=pruned_config.num_heads_per_layer,
        pruned_glu_per_layer=pruned_config.intermediate_size_per_layer,
    )


STEPS = {
    "hf": "step: transformers ModernBertForMaskedLM",
    "ours": "step: ours, gated (search)",
    "ours_no_gates": "step: ours, no gates (dense mode)",
    "ours_pruned": "step: ours, pruned ticket",
}
TARGETS = {"ours / transformers": "<= 1.0"}


def rows_of(r: dict) -> list[list]:
    cpu, wall = r["clocks"]["cpu"], r["clocks"]["wall"]
    step = lambda c, n: f"{c['median_s'][n]:.3f} [{c['quartiles_s'][n][0]:.3f}, {c['quartiles_s'][n][2]:.3f}]"  # noqa: E731
    ratio = lambda c, k: f"{c['ratios'][k]:.3f} [{c['paired_quartiles'][k][0]:.3f}, {c['paired_quartiles'][k][2]:.3f}]"  # noqa: E731
    seq = r["seq_len"]
    rows = [[seq, label, step(cpu, n), step(wall, n), ""] for n, label in STEPS.items()]
    rows += [[seq, k, ratio(cpu, k), ratio(wall, k), TARGETS.get(k, "")] for k in RATIOS]
    share = r["speedup_share_of_flops"]
    return rows + [
        [seq, "FLOPs dense / pruned", f"{r['flops_speedup']:.3f}", "", ""],
        [seq, "pruned speed-up / FLOPs ratio", f"{share['cpu']:.2f}", f"{share['wall']:.2f}", ">= 0.90"],
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=11, help="steps of each variant, interleaved")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    # On a few cores shared with other work, a step of several threads waits at every operation for the thread whose
    # core is busy elsewhere: on this 2-core machine at seq 128, 5-8 s a step with 2 threads, 1.1-1.3 s with one.
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1: see the code)")
    parser.add_argument("--quick", action="store_true", help="seq 128, 5 repetitions; writes modernbert_quick.*")
    args = parser.parse_args(argv)
    seq_lens, reps = ([128], 5) if args.quick else (args.seq_lens, args.reps)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = [measure(seq_len, args.batch, reps, dtype) for seq_len in seq_lens]
    load_after = os.getloadavg()
    results = dict(
        shape=SHAPE,
        vocab_size=ModernBertConfig().vocab_size,
        dtype=args.dtype,
        reps=reps,
        mask_prob=MASK_PROB,
        threads=torch.get_num_threads(),
        load_average_1min=[load_before[0], load_after[0]],
        seconds=time.perf_counter() - started,
        runs=runs,
    )
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    padding = ", ".join(f"seq {r['seq_len']}: {r['pad_fraction']:.1%}" for r in runs)
    threads = f"{results['threads']} thread{'s' if results['threads'] > 1 else ''}"
    notes = (
        f"{shape}, vocabulary {results['vocab_size']}, batch {args.batch}, {args.dtype}, {MASK_PROB:.0%} of the "
        f"real tokens masked, padding as `earlybert prep --no-nsp` shards have it ({padding}). Step = forward + "
        f"backward + AdamW, {reps} interleaved repetitions, {threads}. CPU: this process's CPU time, the step's own "
        "work (with one thread, whatever else runs); wall: what the step took, waits for a busy core included. "
        "Steps: median [quartiles]; ratios: of the medians [quartiles of the per-repetition ratios]. Load average "
        f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores: the machine "
        f"was shared. Pruned ticket: heads per layer {runs[0]['pruned_heads_per_layer']}, GLU widths "
        f"{runs[0]['pruned_glu_per_layer']} (of {SHAPE['num_attention_heads']} and {SHAPE['intermediate_size']}); "
        f"parameters {runs[0]['parameters']['ours_pruned'] / 1e6:.1f}M of {runs[0]['parameters']['ours'] / 1e6:.1f}M "
        "(the embeddings, tied to the decoder, are not pruned, and their AdamW update is not counted in FLOPs). FLOPs: "
        "torch's FlopCounterMode on one forward and backward. Not here: the from-scratch EarlyBERT-vs-dense "
        "pre-training comparison."
    )
    header = ["seq", "measure", "CPU s or ratio: median [quartiles]", "wall s or ratio: median [quartiles]", "target"]
    path = write_results(
        "modernbert_quick" if args.quick else "modernbert",
        results,
        header,
        [row for r in runs for row in rows_of(r)],
        notes,
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
