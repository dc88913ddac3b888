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
the other work on the machine falls on all of them alike; medians of wall time and of this process's CPU time (less
sensitive to that work; it counts the threads' time, spinning included), the spread of the wall times (quartiles),
and per repetition the paired ratios (ours / theirs, dense / pruned), whose quartiles say how far the medians can be
trusted. FLOPs are counted on one forward and backward of each model on the benchmark's batch by torch's
FlopCounterMode (the matrix multiplies and attention as run: SDPA on the CPU computes the whole window of a
sliding-window layer's padded sequence). The from-scratch EarlyBERT-vs-dense pre-training comparison is not here.

    python -m bench.bench_modernbert                    # 6 layers, hidden 384, seq 128 and 512, batch 8, fp32
    python -m bench.bench_modernbert --quick            # seq 128, 5 repetitions (make bench): modernbert_quick.*
    python -m bench.bench_modernbert --dtype bf16 --reps 11
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


def measure(seq_len: int, batch_size: int, reps: int, dtype: torch.dtype, shape: dict = SHAPE) -> dict:
    """Every variant's step at one sequence length, interleaved; medians, spreads, paired ratios and FLOPs."""
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
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    median = {n: statistics.median(wall[n]) for n in names}
    paired = {
        "ours_over_hf": [o / h for o, h in zip(wall["ours"], wall["hf"])],
        "no_gates_over_hf": [o / h for o, h in zip(wall["ours_no_gates"], wall["hf"])],
        "dense_over_pruned": [d / p for d, p in zip(wall["ours_no_gates"], wall["ours_pruned"])],
        "gated_over_pruned": [d / p for d, p in zip(wall["ours"], wall["ours_pruned"])],
    }
    # The structure's speed-up: the dense model without gates against the pruned one (folded: no gates either).
    speedup, ideal = median["ours_no_gates"] / median["ours_pruned"], flops["ours_no_gates"] / flops["ours_pruned"]
    pruned_config = variants["ours_pruned"].config
    return dict(
        seq_len=seq_len,
        batch=batch_size,
        pad_fraction=1 - float(batch["attention_mask"].float().mean()),
        masked_tokens=int((batch["labels"] != -100).sum()),
        step_wall_s=wall,
        step_cpu_s=cpu,
        median_wall_s=median,
        median_cpu_s={n: statistics.median(cpu[n]) for n in names},
        wall_quartiles_s={n: quartiles(wall[n]) for n in names},
        paired_ratio_quartiles={k: quartiles(v) for k, v in paired.items()},
        ratio_ours_over_hf=median["ours"] / median["hf"],
        ratio_no_gates_over_hf=median["ours_no_gates"] / median["hf"],
        cpu_ratio_ours_over_hf=statistics.median(cpu["ours"]) / statistics.median(cpu["hf"]),
        flops=flops,
        parameters={n: parameter_count(m) for n, m in variants.items()},
        pruned_heads_per_layer=pruned_config.num_heads_per_layer,
        pruned_glu_per_layer=pruned_config.intermediate_size_per_layer,
        speedup=speedup,
        cpu_speedup=statistics.median(cpu["ours_no_gates"]) / statistics.median(cpu["ours_pruned"]),
        speedup_from_search=median["ours"] / median["ours_pruned"],
        flops_speedup=ideal,
        speedup_share_of_flops=speedup / ideal,
    )


def rows_of(r: dict) -> list[list]:
    med, cpu, q, pq = r["median_wall_s"], r["median_cpu_s"], r["wall_quartiles_s"], r["paired_ratio_quartiles"]
    step = lambda n: f"{med[n]:.3f} [{q[n][0]:.3f}, {q[n][2]:.3f}]"  # noqa: E731
    span = lambda k: f"[{pq[k][0]:.3f}, {pq[k][2]:.3f}]"  # noqa: E731
    seq = r["seq_len"]
    return [
        [seq, "step: transformers ModernBertForMaskedLM", step("hf"), f"{cpu['hf']:.3f}", ""],
        [seq, "step: ours, gated (search)", step("ours"), f"{cpu['ours']:.3f}", ""],
        [seq, "step: ours, no gates (dense mode)", step("ours_no_gates"), f"{cpu['ours_no_gates']:.3f}", ""],
        [seq, "step: ours, pruned ticket", step("ours_pruned"), f"{cpu['ours_pruned']:.3f}", ""],
        [seq, "ours / transformers", f"{r['ratio_ours_over_hf']:.3f} (paired {span('ours_over_hf')})",
         f"{r['cpu_ratio_ours_over_hf']:.3f}", "<= 1.0"],
        [seq, "ours without gates / transformers", f"{r['ratio_no_gates_over_hf']:.3f} (paired "
         f"{span('no_gates_over_hf')})", f"{cpu['ours_no_gates'] / cpu['hf']:.3f}", ""],
        [seq, "pruned speed-up (no gates / pruned)", f"{r['speedup']:.3f} (paired {span('dense_over_pruned')})",
         f"{r['cpu_speedup']:.3f}", ""],
        [seq, "speed-up at the draw (gated / pruned)", f"{r['speedup_from_search']:.3f} (paired "
         f"{span('gated_over_pruned')})", "", ""],
        [seq, "FLOPs dense / pruned", f"{r['flops_speedup']:.3f}", "", ""],
        [seq, "speed-up / FLOPs ratio", f"{r['speedup_share_of_flops']:.2f}", "", ">= 0.90"],
    ]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=9, help="steps of each variant, interleaved")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    # On a few cores shared with other work, a step of several threads waits at every operation for the thread whose
    # core is busy elsewhere: measured here, 2 threads took 3-6x one thread's time, with 3x the spread.
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
    notes = (
        f"{shape}, vocabulary {results['vocab_size']}, batch {args.batch}, {args.dtype}, {MASK_PROB:.0%} of the "
        f"real tokens masked, padding as `earlybert prep --no-nsp` shards have it "
        f"({padding}). Step = forward + backward + "
        f"AdamW, {reps} interleaved repetitions, {results['threads']} threads; wall medians [quartiles], CPU = this "
        f"process's CPU time (median). Paired: the quartiles of the per-repetition ratios. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after: the machine was shared. Pruned ticket: heads per "
        f"layer {runs[0]['pruned_heads_per_layer']}, GLU widths {runs[0]['pruned_glu_per_layer']} (of "
        f"{SHAPE['num_attention_heads']} and {SHAPE['intermediate_size']}); parameters "
        f"{runs[0]['parameters']['ours_pruned'] / 1e6:.1f}M of {runs[0]['parameters']['ours'] / 1e6:.1f}M (the "
        f"embeddings, tied to the decoder, are not pruned and their AdamW update is not counted in FLOPs). "
        "Not here: the from-scratch EarlyBERT-vs-dense pre-training comparison."
    )
    header = ["seq", "measure", "wall s (median [quartiles]) or ratio", "CPU s or ratio", "target"]
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
