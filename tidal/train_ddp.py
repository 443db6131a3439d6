"""One cycle's training on N processes: torchrun + DistributedDataParallel.

    torchrun --nproc-per-node N -m tidal.train_ddp --params params.yaml --cycle K [--set key=value ...]

`tidal.pipeline.train_step` runs exactly this (as `python -m torch.distributed.run --standalone
...`, see `tidal.launch.launch`) when `distributed.nproc_per_node` > 1, waits, and returns what the
one-process step returns: cycles/<k>/model.pt (same keys) and train_history.json.

Each rank runs `train_step` with a `DistributedContext`: the same workspace, labeled set, seed
and freshly built models as one process, and the one training loop, `tidal.train.train_cycle`:
- Sharding: every rank draws the same permutation and batch split per epoch as one process and
  trains on its part of each global batch (`DistributedContext.shard`, idx[r::world] per half).
- Augmentation is drawn for the whole global batch on every rank, then sliced: each sample gets
  the crop and flip it gets in one process.
- Loss scaling: a rank's loss is its part of the global batch's mean (its mean × its share of
  the samples, or of the pairs for Learning Loss), times world size; DDP's gradient average is
  then the gradient of the global batch's mean loss, uneven shards included.
- TD record: each rank updates the samples it trained on; at each epoch's end the ranks combine
  their updates (TDRecorder.combine), so every later target includes every earlier epoch.
- Epoch metrics (loss, accuracy, td_kl / lloss_rank) are all-reduced: the global history.
- BatchNorm normalizes with the global batch's statistics: SyncBatchNorm on CUDA; on CPU, where
  SyncBatchNorm has no kernels (torch 2.14), tidal.train.GlobalBatchNorm2d (two all_reduces per
  layer). 2 ranks then equal one process up to float rounding: 2 epochs on 75 digits, small-cnn
  with BatchNorm, measured max |Δ| 6e-8 for the parameters, 7.5e-8 for the TD record
  (tests/integration/test_ddp.py).
- Dropout (small-cnn with dropout > 0) draws per rank, so it differs from one process too.

Rank 0 writes the checkpoint and history (atomically) and prints each epoch's record on stdout
(`EPOCH_PREFIX`), which `launch` passes to `on_epoch` while training runs. MLflow: ranks never
log. The flow's train task logs the history after `train_step` returns, i.e. only the launching
process logs, with rank 0's results: "rank 0 only".

Failures end the run, never hang it: torchrun stops the other ranks when one exits non-zero, and
a rank that stops answering makes the others' collectives time out after
`distributed.timeout_s`. `launch` then raises `DistributedTrainingFailed` naming the rank, its
exit code and the output's tail, and `train_step` removes anything rank 0 wrote: a rerun retrains.
Failpoint for tests: TIDAL_FAILPOINT=train_ddp:rank<r>:epoch kills rank r after each epoch
(with TIDAL_FAILPOINT_ACTION=hang it stops answering instead).

Threads: torchrun gives each rank OMP_NUM_THREADS=1 unless it is set; on CPU set it to about
cores / N.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import Any

import torch

from tidal import pipeline
from tidal.config import load_params
from tidal.device import resolve_device
from tidal.launch import EPOCH_PREFIX, check_devices
from tidal.train import DistributedContext


def backend_for(params: dict[str, Any], device: torch.device) -> str:
    backend = params["distributed"]["backend"]
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def _report(record: dict) -> None:
    # One write per line: lines of the two ranks on one pipe do not interleave.
    sys.stdout.write(EPOCH_PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m tidal.train_ddp",
                                     description="Train one cycle with DistributedDataParallel (one rank).")
    parser.add_argument("--params", default=None, help="params file (default: the built-in defaults)")
    parser.add_argument("--cycle", type=int, required=True, help="the cycle to train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("tidal.train_ddp is one rank of a distributed run: start it with "
                         "`torchrun --nproc-per-node N -m tidal.train_ddp ...`")
    params = load_params(args.params, args.set)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(params["device"])
    if device.type == "cuda":
        check_devices(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend_for(params, device),
                                         timeout=timedelta(seconds=params["distributed"]["timeout_s"]))
    try:
        pipeline.train_step(params, args.cycle, on_epoch=_report if rank == 0 else None,
                            distributed=DistributedContext(rank, world))
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    # record: a rank's exception and traceback go into torchrun's failure summary.
    sys.exit(record(main)())
