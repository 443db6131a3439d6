"""One rank of test_ddp.py's comparison run, started by torchrun (gloo, CPU):

    torchrun --standalone --nproc-per-node 2 ddp_worker.py DATA_ROOT OUT_FILE

trains every case of CASES with `train_cycle` and a DistributedContext; rank 0 saves the
results. test_ddp.py trains the same cases in one process (`train_case` without `dist`).

The networks are small-cnn and the TD / loss prediction modules with their kinks smoothed:
ReLU -> SiLU, MaxPool2d -> AvgPool2d. Two float32 runs whose sums are added in different orders
differ by rounding; at a kink (a ReLU input near 0, two max-pool inputs within rounding of each
other) that rounding picks a different branch and reroutes a whole gradient term. That happened:
one max-pool near-tie at step 4 of 6 moved small-cnn's weights by 3e-5 between one process at 1
and at 2 threads, 500× their rounding difference. A bound derived from float32 arithmetic
(test_ddp's float32_bound, tests/rounding.py) holds only where the results are smooth functions of the rounding.
ReLU and max-pooling act on each sample alone, the same on every rank: what the ranks must get
right (global BatchNorm, sharding, loss scaling, gradient averaging, TD record and metric
sums) is all still here. The real small-cnn trains on two processes through train_step in
test_train_step_on_two_processes_writes_what_one_process_writes.
"""
from __future__ import annotations

import contextlib
import sys
from datetime import timedelta
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tidal.data import load_dataset
from tidal.models import LossPredictor, TDPredictor, build_backbone
from tidal.train import DistributedContext, LossPredTask, TDTask, TrainConfig, train_cycle

# 75 samples in batches of 32: 32, 32 and an odd tail of 11 (uneven shards: 6 and 5).
N_SAMPLES = 75
CFG = TrainConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[1],
                  td_weight=1.0, crop_pad=1, hflip=True, lloss_weight=1.0, lloss_detach_epoch=1)
# name: (aux module, BatchNorm kept). Without BatchNorm, DDP equals one process up to float rounding.
CASES = {"td": ("td", True), "td-nobn": ("td", False), "lloss-nobn": ("lloss", False)}


def _without_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            _without_batchnorm(child)


def _smooth(module: nn.Module) -> None:
    """ReLU -> SiLU (in place where the ReLU was), MaxPool2d -> AvgPool2d: no kinks (module docstring)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.SiLU(inplace=child.inplace))
        elif isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        else:
            _smooth(child)


def _pooled(module: TDPredictor | LossPredictor, features: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([F.silu(fc(f.mean(dim=(2, 3)))) for fc, f in zip(module.branches, features)], dim=1)


class SmoothTDPredictor(TDPredictor):
    """TDPredictor with SiLU for its ReLU (same parameters)."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.out(_pooled(self, features))


class SmoothLossPredictor(LossPredictor):
    """LossPredictor with SiLU for its ReLU (same parameters)."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.out(_pooled(self, features)).squeeze(1)


@contextlib.contextmanager
def travelled() -> Iterator[dict]:
    """Records the SGD steps taken inside: `steps`, and `path`, per parameter (in the optimizer's
    order), Σ_t lr_t × max|momentum buffer_t|. SGD's update is exactly lr × buffer, so this is the
    length of the path the parameter travelled, in the max norm (the scale of tests/rounding.py's
    rounding_bound)."""
    record: dict = {"steps": 0, "path": {}}

    def after_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        record["steps"] += 1
        for group in opt.param_groups:
            for p in group["params"]:
                buf = opt.state[p].get("momentum_buffer")
                if buf is not None:
                    record["path"][p] = record["path"].get(p, 0.0) + group["lr"] * buf.abs().max().item()

    hook = register_optimizer_step_post_hook(after_step)
    try:
        yield record
    finally:
        hook.remove()


def train_case(name: str, data_root: str, seed: int = 3, dist: DistributedContext | None = None) -> dict:
    """Train one case. Besides the trained state and history, for test_ddp's float32 bounds: `path`
    per parameter ("backbone.<key>", "aux.<key>") and `steps` (`travelled`); `logits`, those of each
    forward; `batchnorm_layers` and `pixels` (H×W of an image), the sizes of the reordered sums."""
    kind, batchnorm = CASES[name]
    data = load_dataset(data_root, "digits")
    torch.manual_seed(0)
    backbone = build_backbone("small-cnn", data.in_channels, data.num_classes)
    if not batchnorm:
        _without_batchnorm(backbone)
    _smooth(backbone)
    if kind == "td":
        task = TDTask(SmoothTDPredictor(backbone.stage_channels, data.num_classes), CFG.td_weight)
    else:
        task = LossPredTask(SmoothLossPredictor(backbone.stage_channels), CFG.lloss_weight, CFG.lloss_detach_epoch)
    logits: list[torch.Tensor] = []
    hook = backbone.register_forward_hook(lambda module, args, out: logits.append(out[0].detach().clone()))
    try:
        with travelled() as record:
            history = train_cycle(backbone, task, data.pool_images[:N_SAMPLES], data.pool_labels[:N_SAMPLES], CFG,
                                  torch.device("cpu"), seed, dist=dist)
    finally:
        hook.remove()
    names = {p: f"{part}.{k}" for part, module in (("backbone", backbone), ("aux", task.module))
             for k, p in module.named_parameters()}
    out = {"backbone": {k: v.clone() for k, v in backbone.state_dict().items()},
           "aux": {k: v.clone() for k, v in task.module.state_dict().items()}, "history": history,
           "path": {names[p]: v for p, v in record["path"].items()}, "steps": record["steps"], "logits": logits,
           "batchnorm_layers": sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()),
           "pixels": data.pool_images[0, 0].numel()}
    if kind == "td":
        out["td_mean"], out["td_count"] = task.recorder.mean.clone(), task.recorder.count.clone()
    return out


def main(data_root: str, out_file: str) -> None:
    torch.use_deterministic_algorithms(True)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        ctx = DistributedContext(torch.distributed.get_rank(), torch.distributed.get_world_size())
        results = {name: train_case(name, data_root, dist=ctx) for name in CASES}
        if ctx.rank == 0:
            torch.save(results, out_file)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
