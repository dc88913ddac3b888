"""bench.common.run_interleaved, which the end-to-end benchmark's wall-time comparison rests on:
jobs really take turns, a job never runs inside its recorded pauses, and a job can wait for
another's output."""

import sys
import time

from bench.common import paused_within, run_interleaved

# Busy for seconds / 5 ms ticks of its own running time, writing a timestamp per tick; then DONE.
WORKER = """
import sys, time
out, seconds = sys.argv[1], float(sys.argv[2])
stamps = []
for _ in range(int(seconds / 0.005)):
    stamps.append(time.time())
    t = time.time()
    while time.time() - t < 0.005:
        pass
open(out, "w").write("\\n".join(map(repr, stamps)))
open(out + ".done", "w").write("")
"""


def stamps(path):
    return [float(x) for x in path.read_text().split()]


def test_jobs_take_turns_and_never_run_inside_their_pauses(tmp_path):
    cmd = lambda name, seconds: lambda: [sys.executable, "-c", WORKER, str(tmp_path / name), str(seconds)]
    late = lambda: cmd("c", 0.3)() if (tmp_path / "a.done").exists() else None
    started = time.time()
    jobs = run_interleaved({"a": cmd("a", 0.6), "b": cmd("b", 1.2), "c": late}, logs=tmp_path / "logs", slice_s=0.2)
    elapsed = time.time() - started
    assert all(j.returncode == 0 for j in jobs.values()), jobs
    a, b, c = stamps(tmp_path / "a"), stamps(tmp_path / "b"), stamps(tmp_path / "c")
    assert c[0] > a[-1]  # c started only after a had finished
    # Never two at once: the merged timeline switches jobs only a few times per slice, not per tick.
    timeline = sorted([(t, "a") for t in a] + [(t, "b") for t in b] + [(t, "c") for t in c])
    switches = sum(x[1] != y[1] for x, y in zip(timeline, timeline[1:]))
    assert 4 <= switches <= elapsed / 0.2 + 2, switches
    for name, ts in (("a", a), ("b", b), ("c", c)):
        assert not any(start < t < end for t in ts for start, end in jobs[name].pauses)
        assert ts[-1] - ts[0] - paused_within(jobs[name].pauses, ts[0], ts[-1]) <= jobs[name].active_s
    assert sum(j.active_s for j in jobs.values()) <= elapsed
    assert jobs["b"].active_s > 1.3 * jobs["a"].active_s  # twice the work


def test_a_failed_job_leaves_the_waiting_job_unstarted(tmp_path):
    jobs = run_interleaved(
        {"bad": lambda: [sys.executable, "-c", "raise SystemExit(3)"], "never": lambda: None},
        logs=tmp_path / "logs",
        slice_s=0.2,
    )
    assert jobs["bad"].returncode == 3 and jobs["never"].returncode is None


def test_modernbert_bench_measures_every_variant_on_a_tiny_shape():
    """bench/bench_modernbert.py's measurement at a tiny shape: the models are built on the same weights, the ticket
    keeps 2 of 3 heads per layer, and the figures it reports are consistent."""
    import torch

    from bench.bench_modernbert import measure

    shape = dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=3, intermediate_size=40, vocab_size=300)
    shape.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    r = measure(seq_len=16, batch_size=2, reps=2, dtype=torch.float32, shape=shape)
    for clock in r["clocks"].values():
        assert set(clock["median_s"]) == {"hf", "ours", "ours_no_gates", "ours_pruned"}
        assert all(len(v) == 2 for v in clock["steps_s"].values())
    assert r["pruned_heads_per_layer"] == [2, 2, 2] and sum(r["pruned_glu_per_layer"]) == round(3 * 40 * 0.6)
    # The gates' scaling is no matrix multiply; unpadded, ours multiplies the real tokens only, theirs the padding too.
    assert r["flops"]["ours"] == r["flops"]["ours_no_gates"] < r["flops"]["hf"]
    speedup = r["clocks"]["cpu"]["ratios"]["pruned speed-up (no gates / pruned)"]
    assert r["flops_speedup"] > 1 and r["speedup_share_of_flops"]["cpu"] == speedup / r["flops_speedup"]


def test_e2e_scratch_modernbert_runs_its_config_as_a_modernbert_run_with_its_masking(tmp_path):
    """bench_e2e --parts scratch-modernbert: its runs read launch/configs/scratch-modernbert.yaml's model and data
    sections as `earlybert train` reads them, and its results go beside, not over, the BERT part's."""
    import argparse

    from bench import bench_e2e
    from pipeline.pretrain.config import load_pretrain_config

    args = argparse.Namespace(quick=False, parts=["scratch-modernbert"], corpus=["python-docs"], steps=40,
                              pretraining_seeds=2, minilm_corpus=["python-docs"], minilm_steps=8, mask_seeds=3,
                              seeds=3, slice_s=10.0, work=tmp_path)  # fmt: skip
    s = bench_e2e.settings_from(args)
    (part,) = s.parts
    assert s.results == "e2e_scratch_modernbert" and not part.downstream and part.steps == 40
    assert len(s.run_names(part)) == 7
    cfg = load_pretrain_config(str(bench_e2e.pretrain_config(s, part, tmp_path / "shards", None, tmp_path)))
    assert cfg.model.family == "modernbert" and cfg.data.mask_prob == 0.3
    assert cfg.model.overrides["local_attention"] == 32 and cfg.earlybert.lambda_ffn == bench_e2e.LAMBDA
