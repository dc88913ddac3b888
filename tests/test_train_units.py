"""`earlybert train` pieces that need no process group: run config, sampler, masking, LR schedule,
checkpoint bookkeeping, launcher detection. The DeepSpeed runs are in test_train_runs.py."""

import json
import os
import signal
import types
from functools import partial

import numpy as np
import pytest
import torch

from faults_table import tried
from pipeline.config import OptimConfig
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import lr_factor, set_schedule_step
from pipeline.pretrain.loader import Permutation, mask_tokens, rank_positions, stream_samples
from pipeline.run import checkpoint
from pipeline.run.metrics import truncate_after

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_lr_schedule():
    total = 100
    linear = [lr_factor(OptimConfig(schedule="linear", warmup_steps=10), total, s) for s in range(total)]
    assert linear[0] == pytest.approx(0.1) and linear[9] == 1.0 and linear[10] == 1.0  # first step trains
    assert all(a >= b for a, b in zip(linear[10:], linear[11:])) and 0 < linear[-1] < 0.02
    cosine = [lr_factor(OptimConfig(schedule="cosine", warmup_steps=0), total, s) for s in range(total)]
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and 0 < cosine[-1] < 0.01
    assert lr_factor(OptimConfig(schedule="constant", warmup_steps=4), total, 99) == 1.0


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_warms_up_holds_the_peak_then_decays_over_its_last_steps(shape):
    optim = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape)
    factors = [lr_factor(optim, 100, s) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10:81] == [1.0] * 71  # stable: exactly the peak up to the decay's first step (80)
    decay = factors[80:]
    assert all(a > b > 0 for a, b in zip(decay, decay[1:]))
    progress = np.arange(20) / 20
    assert decay == pytest.approx((1 - (np.sqrt(progress) if shape == "1-sqrt" else progress)).tolist())
    # 1-sqrt falls faster first: half the peak a quarter into the decay, where linear is at 3/4.
    assert decay[5] == pytest.approx(0.5 if shape == "1-sqrt" else 0.75)
    # A decay_fraction smaller than one step still decays over the last step; none of it comes before.
    tiny = OptimConfig(schedule="wsd", decay_fraction=0.001, decay_shape=shape)
    assert [lr_factor(tiny, 10, s) for s in (8, 9)] == [1.0, 1.0] and tiny.wsd_decay_start(10) == 9


def test_set_schedule_step_moves_a_wsd_schedule_to_any_step_and_it_runs_on_from_there():
    """A rewind (pipeline/pretrain/loop.py) puts the rebuilt engine's schedule back with set_schedule_step: the
    steps that follow take the schedule's own lrs, into its decay."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    optim = OptimConfig(schedule="wsd", warmup_steps=2, decay_fraction=0.5)
    engine = types.SimpleNamespace(lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, optim, 10)))
    for start in (8, 3):  # forward into the decay, then back into the stable phase
        set_schedule_step(engine, start)
        lrs = []
        for _ in range(start, 10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            engine.lr_scheduler.step()
        assert lrs == pytest.approx([2.0 * lr_factor(optim, 10, s) for s in range(start, 10)])


# ---- sampler and masking ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1025])
def test_permutation_is_a_bijection_that_changes_with_the_epoch(n):
    p0, p1 = Permutation(n, 7, 0, 0)(np.arange(n)), Permutation(n, 7, 0, 1)(np.arange(n))
    assert sorted(p0.tolist()) == list(range(n)) == sorted(p1.tolist())
    if n >= 64:
        assert (p0 != p1).mean() > 0.9 and (p0 != np.arange(n)).mean() > 0.9


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_every_sample_once_per_epoch_whatever_the_rank_count(world, micro):
    """The same global batch on any number of ranks covers the same stream positions, each once."""
    n, global_batch = 53, 8
    grad_accum = global_batch // (micro * world)
    positions = [
        rank_positions(start, micro, world, r, m)
        for start in range(0, 2 * n + 6, global_batch)
        for m in range(grad_accum)
        for r in range(world)
    ]
    positions = np.concatenate(positions)
    assert sorted(positions.tolist()) == list(range(len(positions)))  # no gap, no repeat
    epochs, indices = stream_samples(positions, n, seed=3, phase=0)
    for e in (0, 1):
        assert sorted(indices[epochs == e].tolist()) == list(range(n))
    # Resuming at any step boundary continues the same stream.
    resumed = stream_samples(positions[16:], n, seed=3, phase=0)[1]
    assert (resumed == indices[16:]).all()


def _batch(rows=16, seq_len=40, vocab=500, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(rows, seq_len))
    lengths = rng.integers(8, seq_len + 1, size=rows)
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = SPECIAL["cls"]
    ids[np.arange(rows), lengths - 1] = SPECIAL["sep"]
    ids[mask == 0] = SPECIAL["pad"]
    return ids, mask


def test_masking_is_bert_like():
    ids, attn = _batch(rows=400, seq_len=64, vocab=3000)
    epochs, index = np.zeros(400, dtype=np.int64), np.arange(400)
    masked, labels = mask_tokens(
        ids, attn, epochs, index, seed=1, phase=0, mask_prob=0.15, special_ids=SPECIAL, vocab_size=3000
    )
    sel = labels != -100
    maskable = (attn == 1) & ~np.isin(ids, [SPECIAL[k] for k in ("cls", "sep", "pad")])
    assert not (sel & ~maskable).any()  # never [CLS], [SEP] or padding
    assert (labels[sel] == ids[sel]).all() and (masked[~sel] == ids[~sel]).all()
    assert np.abs(sel.sum(1) - np.floor(0.15 * maskable.sum(1) + 0.5)).max() == 0  # exactly 15% per sequence
    to_mask = (masked[sel] == SPECIAL["mask"]).mean()
    kept = (masked[sel] == ids[sel]).mean()
    assert 0.77 < to_mask < 0.83 and 0.08 < kept < 0.12  # 80% [MASK], 10% kept, the rest random
    assert not np.isin(masked[sel & (masked != ids) & (masked != SPECIAL["mask"])], list(SPECIAL.values())).any()


def test_masking_depends_only_on_seed_epoch_and_sample():
    ids, attn = _batch()
    epochs, index = np.zeros(16, dtype=np.int64), np.arange(100, 116)
    kw = dict(seed=5, phase=0, mask_prob=0.15, special_ids=SPECIAL, vocab_size=500)
    whole = mask_tokens(ids, attn, epochs, index, **kw)
    # The same samples split over "ranks" in another order get the same masks.
    order = np.random.default_rng(1).permutation(16)
    parts = mask_tokens(ids[order], attn[order], epochs[order], index[order], **kw)
    for a, b in zip(whole, parts):
        assert (a[order] == b).all()
    next_epoch = mask_tokens(ids, attn, epochs + 1, index, **kw)
    other_seed = mask_tokens(ids, attn, epochs, index, **{**kw, "seed": 6})
    assert (next_epoch[1] != whole[1]).any() and (other_seed[1] != whole[1]).any()


# ---- checkpoints, metrics, signals, launchers ----------------------------------------------------


def _fake_tag(ckpt, step):
    folder = ckpt / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / checkpoint.RUN_STATE).write_text(json.dumps(checkpoint.RunState(step=step).to_dict()))
    (folder / checkpoint.ARCHITECTURE).write_text("{}")


def test_prune_keeps_the_newest_complete_tags_and_drops_crash_leftovers(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _fake_tag(tmp_path, step)
    (tmp_path / checkpoint.LATEST).write_text(checkpoint.tag_for(40))  # step_50: a save that crashed
    checkpoint.remove_old(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000030", "step_00000040"]
    state, arch = checkpoint.read_tag(tmp_path, checkpoint.latest_tag(tmp_path))
    assert state.step == 40 and arch == {}


def test_latest_naming_an_incomplete_tag_is_an_error(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    (tmp_path / checkpoint.LATEST).write_text("step_00000007")
    with pytest.raises(checkpoint.CheckpointError, match="has no run_state.json"):
        checkpoint.latest_tag(tmp_path)


def test_metrics_after_a_resume_keep_one_line_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    truncate_after(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_sigterm_and_sigusr1_only_raise_a_flag():
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            stop = distributed.StopRequest()
            os.kill(os.getpid(), sig)
            assert stop.signum == sig
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_launcher_detection_and_slurm_rank_mapping():
    torch_env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1")
    assert distributed.detect_launcher(torch_env) == "env"
    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "MASTER_ADDR": "n1",
    }
    assert distributed.detect_launcher(srun) == "slurm"
    assert distributed.slurm_env(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "32345"}
    batch_script = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}
    assert distributed.detect_launcher(batch_script) == "single"
    assert distributed.detect_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert distributed.detect_launcher({}) == "single"


def test_cpu_threads_split_the_cores_a_rank_may_run_on_between_the_ranks_sharing_them(monkeypatch):
    import torch
    import torch.distributed as dist

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    port = distributed.free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
        distributed.set_cpu_threads(distributed.DistInfo(0, 1, 0, torch.device("cpu"), "single"))
        assert torch.get_num_threads() == 6
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
        torch.set_num_threads(3)
        distributed.set_cpu_threads(distributed.DistInfo(0, 1, 0, torch.device("cpu"), "single"))
        assert torch.get_num_threads() == 3
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(before)


@tried("exit_finalizing")
def test_a_rank_ends_after_its_atexit_handlers_without_finalizing_the_interpreter():
    """pipeline.engine.distributed.end_rank_process: a gloo worker thread that releases Python tensors while the
    interpreter finalizes aborts the rank (issue 21; bench/zero3_exit_loop.py), so a rank's process ends before
    finalization, after flushing its output and running its atexit handlers; other processes just return."""
    import subprocess
    import sys

    script = (
        "import atexit, sys\n"
        "from pipeline.engine import distributed\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        print('finalized', flush=True)\n"
        "kept = Finalized()\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "distributed._joined_a_process_group = sys.argv[1] == 'rank'\n"
        "print('buffered', end='')\n"
        "sys.exit(distributed.end_rank_process(3) + 1)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    rank = subprocess.run([sys.executable, "-c", script, "rank"], capture_output=True, text=True, env=env)
    assert rank.returncode == 3 and rank.stdout == "bufferedatexit ran\n", rank.stdout + rank.stderr
    other = subprocess.run([sys.executable, "-c", script, "prep"], capture_output=True, text=True, env=env)
    assert other.returncode == 4 and other.stdout == "bufferedatexit ran\nfinalized\n", other.stdout + other.stderr
