"""What the orchestration costs: the same experiment through the library, the Prefect flow, and
the Prefect flow with MLflow tracking, alternating in one process (issue 6, target ≤ 15 %).

    python benchmarks/overhead.py --rounds 3            # the embedded default (params.yaml: digits)
    python benchmarks/overhead.py --rounds 1 --set preset=debug   # a quick look

Variants, each a complete experiment (all cycles) from an empty workspace, same seed:
- `library`: `tidal.bench.run_trial`, the pipeline steps called directly, tracking off;
- `flow-untracked`: `flows.experiment.experiment`, Prefect task runs, tracking off;
- `flow`: the same flow with MLflow tracking on (sqlite store under --out), i.e. `tidal run`.

The Prefect temporary server starts on the first flow call of the process; that call is a
warm-up, reported on its own as `cold_start_s` and left out of the ratios (a deployment's
worker talks to a server that is already up). Rounds rotate the order of the variants so
that a load change on this shared machine spreads over all of them; ratios are taken from
per-round medians. Writes `<out>/overhead.json` and `<out>/README.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("library", "flow-untracked", "flow")


def configure_environment(out: Path) -> None:
    """Quiet, telemetry-free Prefect with its own home; call before prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("CI", "1")  # no progress bars in the log
    os.environ.setdefault("PREFECT_HOME", str(out / "prefect-home"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"


def run_variant(variant: str, name: str, runs_dir: Path, overrides: list[str]) -> float:
    """Wall seconds of one complete experiment of `variant`."""
    common = [*overrides, f"runs_dir={runs_dir}", f"experiment={name}", f"data_root={REPO / 'data'}"]
    start = time.perf_counter()
    if variant == "library":
        from tidal.bench import run_trial

        run_trial(common, runs_dir / "bench")
    else:
        from flows.experiment import experiment

        tracking = "true" if variant == "flow" else "false"
        experiment(params_path=str(REPO / "params.yaml"), overrides=[*common, f"tracking={tracking}"])
    return time.perf_counter() - start


def measure(out: Path, rounds: int, overrides: list[str],
            run: Callable[[str, str, Path, list[str]], float] = run_variant) -> dict[str, Any]:
    runs_dir = out / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    load_at_start = os.getloadavg()[0]
    cold = run("flow", "warm-up", runs_dir, overrides)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for variant in order:
            seconds = run(variant, f"{variant}-r{r}", runs_dir, overrides)
            times[variant].append(seconds)
            print(f"round {r}: {variant:15s} {seconds:7.1f} s", flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    return {
        "overrides": overrides, "rounds": rounds, "cold_start_s": cold, "seconds": times, "median_s": med,
        # Other work on the machine shows here (1-minute load average; the benchmark itself adds ~1).
        "load_avg_1min": {"start": load_at_start, "end": os.getloadavg()[0]}, "cpu_count": os.cpu_count(),
        "prefect_overhead": med["flow-untracked"] / med["library"] - 1,
        "mlflow_overhead": (med["flow"] - med["flow-untracked"]) / med["library"],
        "total_overhead": med["flow"] / med["library"] - 1,
    }


def write_report(out: Path, result: dict[str, Any], command: str) -> None:
    med = result["median_s"]
    lines = [
        "# Orchestration overhead", "", "Produced by (from the repository root):", "", "```bash", command,
        "```", "",
        f"{result['rounds']} round(s), variants alternating, each a complete experiment from an empty "
        "workspace. Median wall seconds:", "",
        "| variant | median (s) | every round (s) | vs library |", "|---|---|---|---|",
    ]
    for v in VARIANTS:
        each = ", ".join(f"{t:.1f}" for t in result["seconds"][v])
        lines.append(f"| {v} | {med[v]:.1f} | {each} | {med[v] / med['library']:.3f}× |")
    lines += [
        "", f"- Prefect (task runs, state API calls): {100 * result['prefect_overhead']:+.1f} %",
        f"- MLflow tracking on top: {100 * result['mlflow_overhead']:+.1f} %",
        f"- **Total, flow with tracking vs library: {100 * result['total_overhead']:+.1f} %** (target ≤ 15 %)",
        f"- Not in the ratios: the first flow call of a process also started Prefect's temporary "
        f"server; that call took {result['cold_start_s']:.1f} s in all.",
        f"- Load average (1 min) at start / end: {result['load_avg_1min']['start']:.2f} / "
        f"{result['load_avg_1min']['end']:.2f} on {result['cpu_count']} cores.", "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead"))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    configure_environment(out)
    threads = os.environ.get("OMP_NUM_THREADS")  # part of the measurement: say it in the command
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/overhead.py " + " ".join(
        [f"--rounds {args.rounds}", *(f"--set {shlex.quote(o)}" for o in args.overrides)])
    result = measure(out, args.rounds, args.overrides)
    (out / "overhead.json").write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    write_report(out, result, command)
    print((out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    from tidal.signals import exit_on_sigterm

    exit_on_sigterm()  # `kill PID` stops the benchmark and its Prefect server
    sys.exit(main())
