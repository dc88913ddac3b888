"""The warmup-stable-decay schedule (`optim.schedule: wsd`) through EarlyBERT's draw on 2 ranks (gloo, bert-tiny,
ZeRO-1, the tiny config of conftest.py): one schedule over the run, carried across the engine rebuild at the draw
and across a resume, the uninterrupted run's lrs and losses reproduced."""

import pytest

from runs import EARLYBERT, TOTAL, assert_same_losses, deepspeed, faulty_train, finish, finished_run, metrics, ticket

pytestmark = pytest.mark.slow

# Warmup over steps 1-2, the peak until the draw (forced at step 6) and on, then 1-sqrt decay over the last quarter
# of the 12 steps (10-12), which the pruned model trains through.
WSD = (*EARLYBERT, "optim.schedule=wsd", "optim.decay_fraction=0.25", "optim.decay_shape=1-sqrt")


@pytest.fixture(scope="module")
def wsd_reference(config, tmp_path_factory):
    return finished_run(config, tmp_path_factory, "wsd_reference", *WSD)


def test_wsd_schedule_runs_through_the_draw_as_one_schedule(config, wsd_reference):
    """Every step's lr is the schedule's own: the rebuild at the draw carries the schedule's step count (a
    schedule started afresh there would warm up again), and the ticket decays at the end of the run."""
    from pipeline.engine.deepspeed_engine import lr_factor
    from pipeline.pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(str(config), [f"run_dir={wsd_reference}", *WSD])
    draw, decay_start = ticket(wsd_reference)["draw_step"], cfg.optim.wsd_decay_start(TOTAL)
    assert cfg.optim.warmup_steps < draw < decay_start == 9
    lrs = [m["lr"] for m in metrics(wsd_reference)]
    assert lrs == pytest.approx([cfg.optim.lr * lr_factor(cfg.optim, TOTAL, s) for s in range(TOTAL)], rel=1e-9)
    assert lrs[cfg.optim.warmup_steps : decay_start + 1] == [cfg.optim.lr] * (decay_start + 1 - cfg.optim.warmup_steps)
    assert lrs[-1] < lrs[-2] < lrs[decay_start] / 2  # 1-sqrt: below half the peak a third into the decay


KILL_POINTS = {  # what fails, when, and the checkpoint the run resumes from
    # the rebuild that carries the schedule's step count: resumed from step 3, the draw again
    "during the draw's rebuild": ("pipeline.engine.rebuild:restore_engine", "before", "True", 3),
    # the pruned engine's schedule, saved by DeepSpeed at step 9, comes back at the decay's first step
    "after the checkpoint of step 9": ("pipeline.run.checkpoint:save", "after", "args[2].step == 9", 9),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_wsd_killed_around_the_draw_resumes_to_the_same_lrs_and_losses(config, wsd_reference, tmp_path, point):
    target, when, condition, resumed_at = KILL_POINTS[point]
    run_dir = tmp_path / "run"
    code, out = finish(deepspeed(config, run_dir, *WSD, script=faulty_train(tmp_path, target, when, condition)))
    assert code != 0, out
    code, out = finish(deepspeed(config, run_dir, *WSD))
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{resumed_at:08d}'}" in out
    assert ("ticket drawn at step" in out) == (resumed_at < ticket(wsd_reference)["draw_step"])
    assert ticket(run_dir)["mask_digest"] == ticket(wsd_reference)["mask_digest"]
    assert_same_losses(run_dir, wsd_reference)  # loss, mlm_loss, nsp_loss, lr and samples of every step, 1e-6
