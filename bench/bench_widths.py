"""What `earlybert.detector.ffn_multiple_of` buys: the FFN blocks of a pruned model (global FFN pruning at
the default ratio 0.4 leaves widths such as 1830 or 1887) against the same ticket rounded to multiples of 8
and of 64, forward and backward over one micro-batch. The widths come from `keep_mask` on gates spread as a
search leaves them (1 + 0.3 N(0, 1)), exactly as the detector rounds them.

Rounding moves each layer's width by less than one multiple, so the FLOPs differ slightly between the
variants: the table gives the time per TFLOP as well as the time. Each variant's layers run in turn within a
repetition (interleaved), medians over the repetitions.

    python -m bench.bench_widths                        # CPU default: bert-base widths, 1024 tokens, fp32
    python -m bench.bench_widths --tokens 8192 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import write_results
from pipeline import EarlyBertConfig
from pipeline.earlybert.detector import DetectorConfig, keep_mask

MULTIPLES = (1, 8, 64)


def ticket_widths(config: EarlyBertConfig, multiple_of: int, seed: int) -> list[int]:
    """Per-layer FFN widths of the default global ratio on search-like gates, rounded as the detector does."""
    g = torch.Generator().manual_seed(seed)
    gates = [
        (1.0 + 0.3 * torch.randn(config.intermediate_size, generator=g)).abs() for _ in range(config.num_hidden_layers)
    ]
    masks = keep_mask(gates, DetectorConfig().ffn_prune_ratio, "global", multiple_of)
    return [int(m.sum()) for m in masks]


def ffn_block(hidden: int, width: int, device, dtype) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.GELU(), torch.nn.Linear(width, hidden)).to(
        device, dtype
    )


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-large" if on_gpu else "bert-base")
    parser.add_argument("--tokens", type=int, default=8192 if on_gpu else 1024, help="tokens in the micro-batch")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if on_gpu else "fp32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device, dtype = (
        torch.device("cuda" if on_gpu else "cpu"),
        getattr(torch, {"fp32": "float32"}.get(args.dtype, args.dtype)),
    )
    config = EarlyBertConfig.from_preset(args.preset)
    hidden = config.hidden_size
    widths = {m: ticket_widths(config, m, args.seed) for m in MULTIPLES}
    blocks = {m: [ffn_block(hidden, w, device, dtype) for w in ws] for m, ws in widths.items()}
    x = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)

    def step(layers) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for layer in layers:
            layer(x).float().sum().backward()
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for layers in blocks.values():  # warm-up: allocator, kernels' first calls
        step(layers)
    times = {m: [] for m in MULTIPLES}
    for _ in range(args.reps):
        for m, layers in blocks.items():
            times[m].append(step(layers))

    results, rows = {}, []
    base = statistics.median(times[1])
    for m in MULTIPLES:
        flops = sum(6 * 2 * args.tokens * hidden * w for w in widths[m])  # two GEMMs, forward + backward
        median = statistics.median(times[m])
        results[m] = {"widths": widths[m], "step_s": median, "times_s": times[m], "tflops_per_step": flops / 1e12}
        rows.append(
            [
                m,
                sum(widths[m]),
                f"{median * 1e3:.1f}",
                f"{median / base:.3f}",
                f"{median / (flops / 1e12):.3f}",
                f"{min(times[m]) * 1e3:.1f} - {max(times[m]) * 1e3:.1f}",
            ]
        )
    path = write_results(
        "widths",
        {"preset": args.preset, "tokens": args.tokens, "dtype": args.dtype, "reps": args.reps, "multiples": results},
        ["ffn_multiple_of", "FFN neurons kept", "FFN fwd+bwd (ms)", "x multiple 1", "s per TFLOP", "range (ms)"],
        rows,
        notes=f"{args.preset} widths (hidden {hidden}, {config.num_hidden_layers} layers of {config.intermediate_size} "
        f"neurons, global FFN pruning 0.4), {args.tokens} tokens, {args.dtype}, median of {args.reps} interleaved "
        f"repetitions. Widths at multiple 1: {widths[1]}.",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
