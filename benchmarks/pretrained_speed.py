"""How much a frozen backbone saves: one cycle frozen against one cycle from scratch, same backbone.

    OMP_NUM_THREADS=2 python benchmarks/pretrained_speed.py --data-root PHOTOS [--rounds 2] [--labels 20] \
        [--set KEY=VALUE ...]

On an image folder (ants-bees: `tar xzf ../shared/data/ants-bees.tar.gz -C /tmp`), with the
photos-frozen preset (timm/tf_efficientnet_lite0 at 224 px): first the frozen features of the
whole folder are extracted once into a fresh cache (images/s), then, alternating `--rounds`
times in this one process, one cycle (train, evaluate, score, export, commit: `run_cycle`) of a
new experiment at `--labels` random labels with `train.backbone_mode=frozen` and one with
`scratch` (the same network from a random start, the same training recipe); `--set` changes
both (e.g. `image_size=96`: a scratch cycle of Lite0 at 224 px took over an hour here). The speed-up is the
ratio of the median cycle times, measured in one run since this machine is shared. Results go to
benchmarks/results/pretrained_speed/<name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tidal import inputs, pipeline  # noqa: E402
from tidal.config import load_params  # noqa: E402
from tidal.experiment import prepare_data, start_experiment  # noqa: E402


def one_cycle(overrides: list[str]) -> dict:
    params = load_params(None, overrides)
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    start = time.perf_counter()
    done = pipeline.run_cycle(params, 0)
    return {"seconds": time.perf_counter() - start, "steps": done["seconds"], "accuracy": done["accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--labels", type=int, default=20)
    p.add_argument("--name", default="ants-bees")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a params key for both modes (repeatable)")
    args = p.parse_args()
    out = REPO / "benchmarks" / "results" / "pretrained_speed" / f"{args.name}.json"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TIDAL_CACHE_DIR"] = f"{tmp}/cache"
        base = ["preset=photos-frozen", f"data_root={args.data_root}", "tracking=false", "device=cpu",
                f"initial_size={args.labels}", "cycles=1", "strategy=random", *args.overrides]
        frozen = [*base, "train.backbone_mode=frozen"]
        scratch = [*base, "train.backbone_mode=scratch", "backbone_weights=null"]
        params = load_params(None, frozen)
        data = inputs.dataset_for(params)  # decode the photos first: not part of the extraction's time
        start = time.perf_counter()
        inputs.model_data(params)
        extract_s = time.perf_counter() - start
        n_images = len(data.pool_ids) + len(data.test_labels)
        print(f"feature extraction: {n_images} images in {extract_s:.1f} s, {n_images / extract_s:.2f} img/s", flush=True)
        times: dict[str, list[dict]] = {"frozen": [], "scratch": []}
        for r in range(args.rounds):
            for mode, overrides in (("frozen", frozen), ("scratch", scratch)):
                record = one_cycle([*overrides, f"runs_dir={tmp}/runs", f"experiment={mode}-{r}"])
                times[mode].append(record)
                print(f"round {r} {mode}: {record['seconds']:.1f} s, accuracy {record['accuracy']:.4f}", flush=True)
    median = {m: statistics.median(t["seconds"] for t in runs) for m, runs in times.items()}
    result = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python benchmarks/pretrained_speed.py "
                   + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "images": n_images, "feature_extraction_s": round(extract_s, 1),
        "feature_extraction_img_s": round(n_images / extract_s, 2),
        "labels": args.labels, "cycle_s": {m: [round(t["seconds"], 2) for t in runs] for m, runs in times.items()},
        "cycle_steps_s": times, "median_cycle_s": median,
        "speedup_frozen_over_scratch": round(median["scratch"] / median["frozen"], 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("feature_extraction_img_s", "median_cycle_s",
                                               "speedup_frozen_over_scratch")}))


if __name__ == "__main__":
    main()
