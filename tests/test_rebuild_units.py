"""Parts of the engine rebuild that need no ranks: the optimizer state it creates, the optimizers it refuses."""

import pytest
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.ops.lamb import FusedLamb

from pipeline.config import ConfigError, OptimConfig
from pipeline.engine.deepspeed_engine import EngineSpec, build_engine
from pipeline.engine.rebuild import _create_adam_state


def meta_param() -> torch.nn.Parameter:
    """The meta device stands in for a GPU: a device that is not the CPU."""
    return torch.nn.Parameter(torch.zeros(6, device="meta"))


@pytest.mark.parametrize(
    "options,device",
    [({"fused": True}, "meta"), ({"capturable": True}, "meta"), ({"foreach": True}, "cpu"), ({}, "cpu")],
)
def test_carried_step_of_torch_adamw_lies_where_its_implementation_reads_it(options, device):
    """torch's fused and capturable AdamW read `step` on the parameter's device, in float32; the for-loop and
    foreach ones as a host number, on the CPU (torch.optim.Adam._init_group)."""
    p = meta_param()
    opt = torch.optim.AdamW([p], lr=1e-3, **options)
    _create_adam_state(opt, [p], 7.0)
    step = opt.state[p]["step"]
    assert step.device.type == device and step.dtype == torch.float32 and step.shape == ()
    assert device == "meta" or step.item() == 7.0  # a meta tensor has no value to read
    assert opt.state[p]["exp_avg"].device == p.device and opt.state[p]["exp_avg_sq"].shape == p.shape


@pytest.mark.parametrize("cls", [FusedAdam, FusedLamb, DeepSpeedCPUAdam])
def test_carried_step_of_deepspeed_optimizers_is_an_int(cls):
    """DeepSpeed's optimizers hand `step` to their kernels as an int. Made without building their op (no CUDA
    here): only the state they are given is checked."""
    p = meta_param()
    opt = cls.__new__(cls)
    torch.optim.Optimizer.__init__(opt, [p], {"lr": 1e-3, "amsgrad": False})
    _create_adam_state(opt, [p], 7.0)
    assert type(opt.state[p]["step"]) is int and opt.state[p]["step"] == 7


def test_lamb_is_refused_where_fused_lamb_cannot_run():
    """FusedLamb has no CPU build and no fallback: refused before DeepSpeed is asked, naming the ways out."""
    lamb = {"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 0}}
    spec = EngineSpec(lamb, OptimConfig(), total_steps=10)
    with pytest.raises(ConfigError, match=r"FusedLamb, which cannot run here \(it needs a CUDA device\).*AdamW"):
        build_engine(torch.nn.Linear(2, 2), spec)
