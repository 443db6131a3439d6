"""Is the learner trained properly at every budget? Random labeled sets, validation accuracy.

    python benchmarks/learner.py --name cifar10 --set preset=cpu-cifar10-500 --sizes 500,3000 --seeds 0 \\
        --config base: --config steps0:train.min_steps=0 --config w48:backbone=cifar-cnn

For each seed the pool (the data set's train split) is split once: a validation part of
`--val` samples, drawn at random, and the rest, from which the labeled set of each size is a
seeded random draw (the same draw for every config of a seed). Every config is trained with the
library's own trainer (`tidal.train.train_cycle`, the same call the pipeline makes) on each
labeled set and scored on the validation part. This is how the recipes' defaults are chosen:
the test split is never looked at, unless `--test` is given, which adds the test accuracy of the
same models as a separate column, for reporting a choice already made.

A config is `NAME:KEY=VALUE,KEY=VALUE` over the params (`--params`, `--set`), e.g.
`w48:train.min_steps=600,backbone=cifar-cnn`; `NAME:` alone is the params as they are.

Resumable, like al_curves.py: each (config, size, seed) writes `cells/<config>-n<size>-s<seed>.json`
at once and is skipped when started again; `README.md` (mean validation accuracy per config and
size, steps, images/s) is rebuilt from whatever cells exist.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tidal.config import load_params  # noqa: E402
from tidal.data import materialize  # noqa: E402
from tidal.device import resolve_device, set_deterministic  # noqa: E402
from tidal.evaluate import accuracy  # noqa: E402
from tidal.models import build_backbone  # noqa: E402
from tidal.inputs import model_data, weights_file  # noqa: E402
from tidal.pipeline import build_models  # noqa: E402
from tidal.train import TrainConfig, steps_per_epoch, train_cycle  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "learner"


def parse_config(text: str) -> tuple[str, list[str]]:
    name, _, body = text.partition(":")
    if not name or not _:
        raise SystemExit(f"--config {text!r} must look like NAME:KEY=VALUE,KEY=VALUE (or NAME:)")
    return name, [kv for kv in body.split(",") if kv.strip()]


def split_pool(n_pool: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation positions, the rest in a seeded random order) of a pool of n_pool samples."""
    perm = np.random.default_rng(10_000 + seed).permutation(n_pool)
    return np.sort(perm[:n_val]), perm[n_val:]


def run_cell(params: dict[str, Any], size: int, seed: int, n_val: int, with_test: bool) -> dict[str, Any]:
    materialize(params["data_root"], params["dataset"])  # the embedded digits, written when missing
    data = model_data(params)  # the images, or a frozen backbone's cached features of them
    val, rest = split_pool(len(data.pool_ids), n_val, seed)
    if size > len(rest):
        raise SystemExit(f"size {size} is more than the {len(rest)} pool samples outside the validation part")
    labeled = torch.as_tensor(rest[:size])
    device = resolve_device(params["device"])
    set_deterministic(device)
    torch.manual_seed(seed)
    mode = params["train"]["backbone_mode"]
    if mode == "frozen":  # the head on the cached features (pipeline.build_models)
        backbone = build_models(params, data)[0]
    else:
        backbone = build_backbone(params["backbone"], data.in_channels, data.num_classes, dropout=params["dropout"])
    if mode == "finetune":
        from tidal.models.timm_backbone import load_backbone_weights

        load_backbone_weights(backbone, weights_file(params))
    cfg = TrainConfig.from_params(params["train"])
    start = time.perf_counter()
    history = train_cycle(backbone, None, data.pool_images[labeled], data.pool_labels[labeled], cfg, device, seed,
                          desc=f"n={size} s{seed}")
    train_s = time.perf_counter() - start
    val_pos = torch.as_tensor(val)
    record = {
        "size": size, "seed": seed, "epochs": len(history),
        "steps": len(history) * steps_per_epoch(size, cfg.batch_size),
        "train_s": round(train_s, 2), "train_img_s": round(len(history) * size / train_s, 1),
        "val_accuracy": accuracy(backbone, data.pool_images[val_pos], data.pool_labels[val_pos], device),
        "final_train_accuracy": history[-1]["accuracy"],
    }
    if mode != "frozen":  # cached features have no mirror
        # The same model evaluated on each image and its mirror (eval_hflip): one training, both numbers.
        record["val_accuracy_hflip"] = accuracy(backbone, data.pool_images[val_pos], data.pool_labels[val_pos],
                                                device, hflip=True)
    if with_test:
        record["test_accuracy"] = accuracy(backbone, data.test_images, data.test_labels, device,
                                           hflip=params["eval_hflip"])
    return record


def rebuild_report(root: Path, configs: dict[str, list[str]], sizes: list[int], command: str, n_val: int) -> None:
    cells = [json.loads(p.read_text()) for p in sorted((root / "cells").glob("*.json"))]
    by = {}
    for c in cells:
        by.setdefault((c["config"], c["size"]), []).append(c)
    names = list(dict.fromkeys([*configs, *sorted({c["config"] for c in cells})]))
    has_test = any("test_accuracy" in c for c in cells)
    has_flip = any("val_accuracy_hflip" in c for c in cells)
    lines = [f"# Learner check `{root.name}`", "", "Produced by (from the repository root):", "", "```bash", command,
             "```", "", f"Validation: {n_val} random samples of the pool (the train split), held out of every "
             "labeled set; labeled sets are seeded random draws from the rest, the same for every config of a "
             "seed. Mean over the seeds present; `steps` is optimizer steps per training run"
             + ("; `val, flip TTA` is the same model on each image and its mirror (`eval_hflip`)" if has_flip else "")
             + ("; test accuracy as the config's `eval_hflip` says" if has_test else "") + ".", "",
             "| config | overrides | size | seeds | val accuracy | " + ("val, flip TTA | " if has_flip else "")
             + ("test accuracy | " if has_test else "") + "epochs | steps | train img/s |",
             "|---" * (8 + has_flip + has_test) + "|"]
    for name in names:
        for size in sizes:
            group = by.get((name, size))
            if not group:
                continue
            mean = lambda k: float(np.mean([g[k] for g in group]))  # noqa: E731
            test = f"{mean('test_accuracy'):.4f} | " if has_test and all("test_accuracy" in g for g in group) else (
                "– | " if has_test else "")
            flip = f"{mean('val_accuracy_hflip'):.4f} | " if has_flip and all(
                "val_accuracy_hflip" in g for g in group) else ("– | " if has_flip else "")
            lines.append(f"| {name} | `{','.join(group[0]['overrides']) or '–'}` | {size} | "
                         f"{','.join(str(g['seed']) for g in group)} | {mean('val_accuracy'):.4f} | {flip}{test}"
                         f"{mean('epochs'):.0f} | {mean('steps'):.0f} | {mean('train_img_s'):.0f} |")
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; images/s depend on load (compare speed with "
              "benchmarks/speed.py's alternating runs).", ""]
    (root / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="params file; 'none' for the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--config", dest="configs", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    p.add_argument("--sizes", required=True, help="comma-separated labeled-set sizes")
    p.add_argument("--seeds", default="0")
    p.add_argument("--val", type=int, default=5000, help="validation samples held out of the pool")
    p.add_argument("--test", action="store_true", help="also report test accuracy (never for choosing)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    params_path = None if args.params.lower() == "none" else args.params
    configs = dict(parse_config(c) for c in args.configs)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.out) / args.name
    (root / "cells").mkdir(parents=True, exist_ok=True)
    # CPU results depend on the thread count (the order of float sums): the command says it.
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python benchmarks/learner.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for name, extra in configs.items():  # a bad override fails before anything trains
        load_params(params_path, [*args.overrides, *extra])
    for seed in seeds:
        for size in sizes:
            for name, extra in configs.items():
                path = root / "cells" / f"{name}-n{size}-s{seed}.json"
                if path.is_file():
                    continue
                params = load_params(params_path, [*args.overrides, *extra])
                record = {"config": name, "overrides": [*args.overrides, *extra],
                          **run_cell(params, size, seed, args.val, args.test)}
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1) + "\n")
                os.replace(tmp, path)
                print(f"[learner] {name} n={size} s{seed}: val {record['val_accuracy']:.4f} in "
                      f"{record['train_s']:.0f} s ({record['steps']} steps)", flush=True)
                rebuild_report(root, configs, sizes, command, args.val)
    rebuild_report(root, configs, sizes, command, args.val)


if __name__ == "__main__":
    main()
