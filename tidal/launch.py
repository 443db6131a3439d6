"""The launching side of one cycle's distributed training: torchrun started, watched and explained.

`tidal.pipeline.train_step` calls `launch` when `distributed.nproc_per_node` > 1; each rank runs
`tidal.train_ddp` (the rank's entry point, which says how the ranks split the work). Apart from it
so that the pipeline imports the launcher and the rank imports the pipeline, never both ways.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.config import dump_params
from tidal.device import resolve_device
from tidal.train import TrainingDiverged

EPOCH_PREFIX = "TIDAL_DDP_EPOCH "
TAIL_LINES = 40  # of the ranks' output, in the error of a failed run


class DistributedTrainingFailed(RuntimeError):
    """A rank of a distributed training run failed; the message names it and shows the output's tail."""


def check_devices(device: torch.device, nproc: int) -> None:
    """On CUDA each process needs its own GPU (NCCL cannot share one between ranks)."""
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise RuntimeError(f"distributed.nproc_per_node={nproc} needs one CUDA device per process, but "
                           f"{torch.cuda.device_count()} are visible; lower distributed.nproc_per_node "
                           f"or set device=cpu (backend gloo)")


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
