"""One cycle's training on N processes: torchrun + DistributedDataParallel.

    torchrun --nproc-per-node N -m tidal.train_ddp --params params.yaml --cycle K [--set key=value ...]

`tidal.pipeline.train_step` runs exactly this (as `python -m torch.distributed.run --standalone
...`, see `launch`) when `distributed.nproc_per_node` > 1, waits, and returns what the
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
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.config import dump_params, load_params
from tidal.device import resolve_device
from tidal.train import DistributedContext, TrainingDiverged

EPOCH_PREFIX = "TIDAL_DDP_EPOCH "
TAIL_LINES = 40  # of the ranks' output, in the error of a failed run


class DistributedTrainingFailed(RuntimeError):
    """A rank of a distributed training run failed; the message names it and shows the output's tail."""


def backend_for(params: dict[str, Any], device: torch.device) -> str:
    backend = params["distributed"]["backend"]
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def check_devices(device: torch.device, nproc: int) -> None:
    """On CUDA each process needs its own GPU (NCCL cannot share one between ranks)."""
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise RuntimeError(f"distributed.nproc_per_node={nproc} needs one CUDA device per process, but "
                           f"{torch.cuda.device_count()} are visible; lower distributed.nproc_per_node "
                           f"or set device=cpu (backend gloo)")


# --- the launching process --------------------------------------------------------------------

def launch(params: dict[str, Any], cycle: int, on_epoch: Callable[[dict], None] | None = None) -> None:
    """Train cycle `cycle` on `distributed.nproc_per_node` local processes and wait for them.

    Raises DistributedTrainingFailed (or TrainingDiverged, when that is what a rank raised) if
    any rank fails. The caller checks the files rank 0 wrote.
    """
    nproc = params["distributed"]["nproc_per_node"]
    check_devices(resolve_device(params["device"]), nproc)
    with tempfile.TemporaryDirectory(prefix="tidal-ddp-") as tmp:
        params_path = Path(tmp) / "params.yaml"
        # The params are complete: preset=null, or re-applying the preset would undo overrides.
        params_path.write_text(dump_params({**params, "preset": None}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tidal.train_ddp", "--params", str(params_path), "--cycle", str(cycle)]
        tail: deque[str] = deque(maxlen=200)  # enough for torchrun's failure summary
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(EPOCH_PREFIX):
                    if on_epoch is not None:
                        on_epoch(json.loads(line[len(EPOCH_PREFIX):]))
                    continue
                tail.append(line)
                sys.stderr.write(line)  # the ranks' own output, as if they ran here
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if code != 0:
        raise _failure(cycle, code, "".join(tail))


def _stop(proc: subprocess.Popen) -> None:
    # SIGTERM lets torchrun stop its workers; SIGKILL would leave them running.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _root_cause(output: str) -> str:
    """The entry of torchrun's failure summary that names the rank to blame.

    torchrun's "Root Cause" is the first failure it observed. When a rank is killed (SIGKILL,
    a crash signal), its peers fail at their next collective and one of them may be observed
    first; so a rank ended by a signal other than SIGTERM (which torchrun itself sends to the
    survivors) is the root cause, wherever the summary lists it.
    """
    if "Failures:" not in output:
        return output
    summary = output[output.rfind("Failures:"):]
    entries = [re.split(r"^(?:-{20,}|={20,})\s*$", part, flags=re.MULTILINE)[0]
               for part in re.split(r"^\[\d+\]:\s*$", summary, flags=re.MULTILINE)[1:]]
    if not entries:
        return output
    for entry in entries:
        code = re.search(r"exitcode\s*:\s*(-?\d+)", entry)
        if code and int(code.group(1)) < 0 and int(code.group(1)) != -signal.SIGTERM:
            return entry
    return entries[-1]  # the "Root Cause (first observed failure)" section comes last


def _failure(cycle: int, code: int, output: str) -> Exception:
    """The error for a failed run, from torchrun's summary ("Root Cause": rank, exitcode)."""
    diverged = re.search(r"TrainingDiverged: (.+)", output)
    if diverged:
        return TrainingDiverged(diverged.group(1).strip())
    root = _root_cause(output)
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    exitcode = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    who = f"rank {rank.group(1)}" if rank else "a rank"
    how = ""
    if exitcode:
        value = int(exitcode.group(1))
        how = f" with exit code {value}"
        try:
            how += f" ({signal.Signals(-value).name})" if value < 0 else ""
        except ValueError:  # a signal without a name
            pass
    errors = re.findall(r"^\s*(\w*(?:Error|Exception)\b:.*)$", root, flags=re.MULTILINE)
    if errors:
        how += f": {errors[-1].strip()[:300]}"
    last = "".join(output.splitlines(keepends=True)[-TAIL_LINES:]).rstrip()
    return DistributedTrainingFailed(
        f"distributed training of cycle {cycle} failed: {who} failed{how} (torchrun exit code {code}); "
        f"no checkpoint was kept, a rerun retrains. Last output:\n{last}")


# --- one rank (run by torchrun) -----------------------------------------------------------------

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
    from tidal import pipeline

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
