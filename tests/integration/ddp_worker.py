"""One rank of test_ddp.py's comparison run, started by torchrun (gloo, CPU):

    torchrun --standalone --nproc-per-node 2 ddp_worker.py DATA_ROOT OUT_FILE

trains every case of CASES with `train_cycle` and a DistributedContext; rank 0 saves the
results. test_ddp.py trains the same cases in one process (`train_case` without `dist`).
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch
from torch import nn

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


def train_case(name: str, data_root: str, seed: int = 3, dist: DistributedContext | None = None) -> dict:
    kind, batchnorm = CASES[name]
    data = load_dataset(data_root, "digits")
    torch.manual_seed(0)
    backbone = build_backbone("small-cnn", data.in_channels, data.num_classes)
    if not batchnorm:
        _without_batchnorm(backbone)
    if kind == "td":
        task = TDTask(TDPredictor(backbone.stage_channels, data.num_classes), CFG.td_weight)
    else:
        task = LossPredTask(LossPredictor(backbone.stage_channels), CFG.lloss_weight, CFG.lloss_detach_epoch)
    history = train_cycle(backbone, task, data.pool_images[:N_SAMPLES], data.pool_labels[:N_SAMPLES], CFG,
                          torch.device("cpu"), seed, dist=dist)
    out = {"backbone": {k: v.clone() for k, v in backbone.state_dict().items()},
           "aux": {k: v.clone() for k, v in task.module.state_dict().items()}, "history": history}
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
