"""`python -m tidal.bench`: AL trials straight from the source tree, tracking off.

For a bare GPU box (torch, numpy, pyyaml; no prefect, mlflow or dvc): it calls the same
`tidal.experiment` and `tidal.pipeline` steps the Prefect flows call, times them, and writes one
JSON file per trial (cell) under --out as soon as the trial ends. A grid skips cells that already
have a file, so an interrupted grid resumes where it stopped; `--parallel N` runs N trials at once
(separate processes sharing the machine, e.g. one GPU).

    python -m tidal.bench trial --out DIR --strategy tidal-entropy --seed 0 --preset paper-cifar10 \\
        --tar cifar10-jpg.tar.gz --set dataset=imagefolder --set data_root=DIR/cifar10
    python -m tidal.bench grid --out DIR --strategies random,tidal-entropy --seeds 0,1,2 --parallel 3 ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tidal import inputs, pipeline
from tidal.config import load_params
from tidal.device import resolve_device
from tidal.experiment import load_state, prepare_data, start_experiment
from tidal.inputs import eval_split
from tidal.train import TrainConfig
from tidal.workspace import write_csv, write_json


def cell_name(strategy: str, seed: int) -> str:
    return f"{strategy}-s{seed}"


def unpack_image_folder(tar_path: str | Path, dest: str | Path) -> Path:
    """Unpack `<top>/{train,test}/<class>/*` from a tarball into dest/{train,test} (once)."""
    dest = Path(dest)
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    with tarfile.open(tar_path) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) > 1 and m.isfile():
                m.name = str(Path(*parts[1:]))  # drop the top folder (cifar10/)
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(dest)
    return dest


def train_flops_per_image(backbone: torch.nn.Module, in_shape: tuple[int, ...], device: torch.device) -> float:
    """3 × the forward FLOPs of one image (backward costs about twice the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = backbone.to(device).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(1, *in_shape, device=device))
    return 3.0 * counter.get_total_flops()


def run_trial(overrides: list[str], out: str | Path, peak_tflops: float | None = None) -> dict[str, Any]:
    """One experiment (all its cycles) through the pipeline steps; returns and writes its record."""
    params = load_params(None, ["tracking=false", *overrides])
    out = Path(out)
    device = resolve_device(params["device"])
    info = prepare_data(params)
    start_experiment(params, info["data_version"], info["pool_version"])
    data = inputs.model_data(params)  # with a frozen backbone: its cached features (extracted here, once)
    backbone, _ = pipeline.build_models(params, data)
    flops = train_flops_per_image(backbone, tuple(data.pool_images.shape[1:]), device)
    cycles, start = [], time.perf_counter()
    for cycle in range(load_state(params)["cycle"], params["cycles"]):
        epoch_times: list[float] = []
        last = [time.perf_counter()]

        def on_epoch(record: dict) -> None:
            now = time.perf_counter()  # the trainer reads its sums once per epoch: a device sync
            epoch_times.append(now - last[0])
            last[0] = now

        done = pipeline.run_cycle(params, cycle, on_epoch=on_epoch)
        seconds, n_labeled, acc = done["seconds"], done["n_labeled"], done["accuracy"]
        train_s = seconds["train"]
        # The epochs it trained: train.min_steps raises them on small labeled sets.
        images = n_labeled * TrainConfig.from_params(params["train"]).for_labeled(n_labeled).epochs
        tflops = flops * images / train_s / 1e12 if train_s > 0 else 0.0
        cycles.append({"cycle": cycle, "n_labeled": n_labeled, "accuracy": acc, "train_s": train_s,
                       "epoch_s": epoch_times, "train_img_s": images / train_s if train_s > 0 else 0.0,
                       "train_tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
                       "eval_s": seconds["evaluate"], "score_s": seconds["score"], "commit_s": seconds["commit"],
                       "resumed": done["resumed"]})
        print(f"[{params['experiment']}] cycle {cycle}: {n_labeled} labels, acc {acc:.4f}, "
              f"train {train_s:.1f} s ({cycles[-1]['train_img_s']:.0f} img/s), score {seconds['score']:.1f} s",
              flush=True)
    record = {"experiment": params["experiment"], "strategy": params["strategy"], "seed": params["seed"],
              "dataset": params["dataset"], "backbone": params["backbone"], "device": str(device),
              "split": eval_split(params),  # what each cycle's accuracy was measured on
              "torch": torch.__version__, "train_flops_per_image": flops, "peak_tflops": peak_tflops,
              "wall_s": time.perf_counter() - start, "cycles": cycles, "overrides": overrides}
    write_json(out / "cells" / f"{cell_name(params['strategy'], params['seed'])}.json", record)
    return record


def summarize(out: str | Path) -> Path:
    """cycles.csv from every finished cell (one row per trial and cycle)."""
    out = Path(out)
    rows = []
    for cell in sorted((out / "cells").glob("*.json")):
        rec = json.loads(cell.read_text())
        for c in rec["cycles"]:
            rows.append({"strategy": rec["strategy"], "seed": rec["seed"], "cycle": c["cycle"],
                         "n_labeled": c["n_labeled"], "accuracy": c["accuracy"],
                         "train_s": round(c["train_s"], 3), "train_img_s": round(c["train_img_s"], 1),
                         "mfu": c["mfu"], "score_s": round(c["score_s"], 3), "wall_s": round(rec["wall_s"], 1)})
    path = out / "cycles.csv"
    write_csv(path, list(rows[0]) if rows else ["strategy"], rows)
    return path


def run_grid(strategies: list[str], seeds: list[int], common: list[str], out: str | Path, parallel: int = 1,
             peak_tflops: float | None = None) -> list[str]:
    """Every missing (strategy, seed) cell, `parallel` at a time in separate processes."""
    out = Path(out)
    todo = [(s, seed) for s in strategies for seed in seeds
            if not (out / "cells" / f"{cell_name(s, seed)}.json").is_file()]

    def one(cell: tuple[str, int]) -> str:
        strategy, seed = cell
        name = cell_name(strategy, seed)
        cmd = [sys.executable, "-m", "tidal.bench", "trial", "--out", str(out), "--strategy", strategy,
               "--seed", str(seed), *sum((["--set", o] for o in common), [])]
        if peak_tflops:
            cmd += ["--peak-tflops", str(peak_tflops)]
        (out / "logs").mkdir(parents=True, exist_ok=True)
        with open(out / "logs" / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CI": "1"}).returncode
        return f"{name}: {'done' if code == 0 else f'FAILED (exit {code}), see logs/{name}.log'}"

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        results = list(pool.map(one, todo))
    summarize(out)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidal.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("trial", "grid"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--preset", default=None)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--tar", default=None, help="image-folder tarball to unpack into data_root first")
        p.add_argument("--peak-tflops", type=float, default=None, help="for MFU, e.g. 790 on an H200 (bf16)")
        if name == "trial":
            p.add_argument("--strategy", required=True)
            p.add_argument("--seed", type=int, required=True)
        else:
            p.add_argument("--strategies", required=True)
            p.add_argument("--seeds", required=True)
            p.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args(argv)
    common = ([f"preset={args.preset}"] if args.preset else []) + [f"runs_dir={Path(args.out) / 'runs'}"] + args.set
    if args.tar:
        unpack_image_folder(args.tar, load_params(None, ["tracking=false", *common])["data_root"])
    if args.command == "trial":
        run_trial([*common, f"strategy={args.strategy}", f"seed={args.seed}",
                   f"experiment={cell_name(args.strategy, args.seed)}"], args.out, args.peak_tflops)
        return 0
    results = run_grid(args.strategies.split(","), [int(s) for s in args.seeds.split(",")], common, args.out,
                       args.parallel, args.peak_tflops)
    print("\n".join(results) or "every cell already done")
    return 1 if any("FAILED" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
