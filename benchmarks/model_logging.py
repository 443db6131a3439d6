"""What one MLflow model per cycle costs, against the default experiment's own time, in one run.

    OMP_NUM_THREADS=1 python benchmarks/model_logging.py --rounds 3

Each round: the default experiment (params.yaml: digits, 5 cycles, tidal-entropy) through the
library (`tidal.pipeline.run_cycle`, tracking off) in a fresh workspace, timed: T. Then, for each
of its cycles, a cycle run in a fresh MLflow sqlite store gets that cycle's model the way the
flow logs it (`MlflowTracker.log_cycle_model`: a LoggedModel, pickle format) and, beside it, the
way `tidal register` makes one for a cycle that has none (`MlflowTracker.log_model`: pt2,
torch.export). The ratio is the sum over cycles over T. The first model of a process also pays
MLflow's imports; round 1 shows it, later rounds do not. Writes results.json and README.md under
--out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "model_logging"


def run_experiment(work: Path, data_root: Path) -> tuple[float, list[str]]:
    """The default experiment in a fresh workspace; its wall time and each cycle's checkpoint."""
    from tidal import pipeline
    from tidal.config import load_params
    from tidal.experiment import prepare_data, start_experiment
    from tidal.workspace import workspace

    shutil.rmtree(work / "runs", ignore_errors=True)
    params = load_params(REPO / "params.yaml", ["tracking=false", f"runs_dir={work / 'runs'}",
                                                f"data_root={data_root}"])
    start = time.perf_counter()
    prepared = prepare_data(params)
    start_experiment(params, prepared["data_version"], prepared["pool_version"])
    for cycle in range(params["cycles"]):
        pipeline.run_cycle(params, cycle)
    seconds = time.perf_counter() - start
    ws = workspace(params)
    return seconds, [str(ws.cycle_dir(k) / "model.pt") for k in range(params["cycles"])]


def time_models(store: Path, checkpoints: list[str]) -> dict[str, list[float]]:
    """Seconds per cycle for the flow's LoggedModel (pickle) and for a pt2 model, in a new store."""
    import torch

    from tidal.tracking import MlflowTracker, checkpoint_backbone, checkpoint_spec, example_batch

    store.mkdir()
    tracker = MlflowTracker(f"sqlite:///{store / 'mlflow.db'}")
    experiment = tracker.client.create_experiment("model-logging", artifact_location=(store / "artifacts").as_uri())
    times: dict[str, list[float]] = {"pickle": [], "pt2": []}
    for cycle, checkpoint in enumerate(checkpoints):
        spec = checkpoint_spec(checkpoint)
        run_id = tracker.client.create_run(experiment, run_name=f"cycle-{cycle}").info.run_id
        start = time.perf_counter()
        tracker.log_cycle_model(run_id, checkpoint, spec, cycle)
        times["pickle"].append(time.perf_counter() - start)
        other = tracker.client.create_run(experiment, run_name=f"pt2-{cycle}").info.run_id
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        start = time.perf_counter()
        tracker.log_model(other, checkpoint_backbone(spec, saved), example_batch(spec))
        times["pt2"].append(time.perf_counter() - start)
    return times


def write_readme(out: Path, result: dict[str, Any]) -> None:
    rows = ["| round | experiment (s) | pickle LoggedModels, all cycles (s) | share | pt2 models, all cycles (s) | share |",
            "|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        rows.append(f"| {r['round']} | {r['experiment_s']:.1f} | {sum(r['pickle_s']):.2f} | "
                    f"{r['pickle_share']:.1%} | {sum(r['pt2_s']):.2f} | {r['pt2_share']:.1%} |")
    table = "\n".join(rows)
    text = f"""# One MLflow model per cycle: what it costs

Produced by (from the repository root):

```bash
{result['command']}
```

{table}

Median share over rounds 2 and later (MLflow's imports paid): **pickle {result['median_pickle_share']:.1%}**,
pt2 {result['median_pt2_share']:.1%} of the default experiment's time through the library. The flow logs the
pickle LoggedModel per cycle (`MlflowTracker.log_cycle_model`); `tidal register` makes a pt2 model only
for a cycle run that has no model.

Machine: {result['machine']}; torch threads: {result['threads']}. Times depend on load; the shares are
measured in one run, experiment and models alternating.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from tidal.data.sources import materialize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="tidal-model-logging-") as tmp:
        work = Path(tmp)
        materialize(work / "data", "digits")
        for r in range(1, args.rounds + 1):
            seconds, checkpoints = run_experiment(work, work / "data")
            times = time_models(work / f"mlflow-{r}", checkpoints)
            rounds.append({"round": r, "experiment_s": seconds, "pickle_s": times["pickle"], "pt2_s": times["pt2"],
                           "pickle_share": sum(times["pickle"]) / seconds, "pt2_share": sum(times["pt2"]) / seconds})
            print(f"round {r}: experiment {seconds:.1f} s, pickle models {sum(times['pickle']):.2f} s, "
                  f"pt2 models {sum(times['pt2']):.2f} s", flush=True)
    warm = rounds[1:] or rounds
    result = {
        "command": " ".join(["OMP_NUM_THREADS=1" if os.environ.get("OMP_NUM_THREADS") == "1" else "",
                             "python benchmarks/model_logging.py", *map(shlex.quote, argv or sys.argv[1:])]).strip(),
        "rounds": rounds,
        "median_pickle_share": statistics.median(r["pickle_share"] for r in warm),
        "median_pt2_share": statistics.median(r["pt2_share"] for r in warm),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_readme(out, result)
    return result


if __name__ == "__main__":
    main()
