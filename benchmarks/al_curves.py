"""AL-quality benchmark: a grid of strategies × seeds through the real pipeline.

    python benchmarks/al_curves.py --name digits --strategies random,entropy,tidal-entropy --seeds 0,1,2
    python benchmarks/al_curves.py --name cifar --params params.yaml --set preset=cpu-cifar10 ...

Every cell (strategy, seed) is one run of the Prefect experiment flow
(`flows.experiment.experiment`), tracked in MLflow under `<out>/<name>/mlflow.db` (MLflow
experiment `<name>-<strategy>-s<seed>`), with its workspace under `<out>/<name>/runs`. All cells
share one Prefect temporary server: the flow is called repeatedly in this one process.

Resumable: a finished cell writes `<out>/<name>/cells/<strategy>-s<seed>.json` (learning curve
rows, wall time, settings) at once, and cells with a file are skipped when the grid is started
again; a cell killed half-way resumes from its workspace (the pipeline's steps are resumable).
After each cell the result files are rebuilt from whatever cells exist: `curves.csv`,
`learning_curves.png` and `README.md` (accuracy per budget, AUBC mean ± 95 % CI, paired gain
over random, wall time per cell, and the command).

Paired seeds: for one seed every strategy starts from the same initial labeled set and the same
training seed (the pipeline derives both from `seed`).
"""
from __future__ import annotations

import argparse
import csv
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

DEFAULT_OUT = REPO / "benchmarks" / "results"
CURVE_COLUMNS = ["strategy", "seed", "cycle", "n_labeled", "accuracy"]
# Keys of the cell's params shown in the result README.
SHOWN_KEYS = ["dataset", "backbone", "imbalance_ratio", "validation_size", "cycles", "initial_size", "budget",
              "subset_size", "train.epochs", "train.batch_size", "train.lr", "train.milestones", "train.crop_pad", "train.hflip", "eval_hflip"]


def configure_environment(out_dir: Path) -> None:
    """Process settings for a grid run from the command line; call before prefect is imported.

    One Prefect temporary server (started by the first flow call, reused by every later one)
    with its own home under the results folder, quiet progress bars, no telemetry.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("CI", "1")
    if "PREFECT_API_URL" not in os.environ:
        home = out_dir / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(home))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="result folder name under --out (e.g. digits)")
    p.add_argument("--strategies", required=True, help="comma-separated strategy names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--params", default=str(REPO / "params.yaml"),
                   help="params file (default: the repo's params.yaml); 'none' for the built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one params key for every cell (repeatable)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results root (default benchmarks/results)")
    return p.parse_args(argv)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cell_name(strategy: str, seed: int) -> str:
    return f"{strategy}-s{seed}"


def _atomic_write(path: Path, text: str) -> None:
    from tidal.workspace import atomic_write_text  # the library's one atomic write (temp, fsync, rename)

    atomic_write_text(path, text)


def _resolve_data_root(params_path: str | None, overrides: list[str]) -> list[str]:
    """A relative data_root in the repo's params file means the repo's data/: make it absolute so
    the grid works from any working directory (data_root may change between runs of a cell)."""
    from tidal.config import load_params

    if any(o.split("=", 1)[0].strip() == "data_root" for o in overrides):
        return []
    root = Path(load_params(params_path, overrides)["data_root"])
    return [] if root.is_absolute() else [f"data_root={REPO / root}"]


def _identity(overrides: list[str]) -> list[str]:
    """The overrides that define a grid's cells. data_root says where the data lives, not what it
    is (the pipeline checks the pool's content against each cell's version), so a grid may move."""
    return [o for o in overrides if o.split("=", 1)[0].strip() != "data_root"]


def _ensure_mlflow_experiment(uri: str, name: str, artifacts: Path) -> None:
    """Create the cell's MLflow experiment with its artifacts under the results folder (else
    MLflow would put them in ./mlruns of the working directory)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(artifacts / name).resolve().as_uri())


def run_cell(root: Path, name: str, strategy: str, seed: int, params_path: str | None,
             overrides: list[str]) -> dict[str, Any]:
    """Run (or resume) one cell through the Prefect experiment flow; return its record."""
    from flows.experiment import experiment
    from tidal.config import flatten, load_params

    exp = f"{name}-{strategy}-s{seed}"
    cell_overrides = [*overrides, f"experiment={exp}", f"strategy={strategy}", f"seed={seed}",
                      f"runs_dir={root / 'runs'}"]
    params = load_params(params_path, cell_overrides)
    if params["tracking"]:
        _ensure_mlflow_experiment(os.environ["MLFLOW_TRACKING_URI"], exp, root / "mlartifacts")
    resumed = (root / "runs" / exp / "state.json").is_file()
    start = time.perf_counter()
    history = experiment(params_path=params_path, overrides=cell_overrides)
    wall = time.perf_counter() - start
    flat = flatten(params)
    return {
        "strategy": strategy, "seed": seed, "experiment": exp,
        "rows": [{"strategy": strategy, "seed": seed, "cycle": h["cycle"], "n_labeled": h["n_labeled"],
                  "accuracy": h["accuracy"]} for h in history],
        "wall_s": round(wall, 2),
        "resumed_from_workspace": resumed,
        "settings": {k: flat[k] for k in SHOWN_KEYS if k in flat},
        "overrides": overrides,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cell_row(row: dict) -> dict:
    """A cell's curve row with its accuracy under `accuracy`: the cells committed under
    benchmarks/results/ were written before the pipeline renamed `test_accuracy` to `accuracy`
    (the value is the same: test split, or validation with validation_size > 0)."""
    if "test_accuracy" in row:
        row = {("accuracy" if k == "test_accuracy" else k): v for k, v in row.items()}
    return row


def load_cells(cells_dir: Path) -> list[dict]:
    """Every finished cell, its rows read by `cell_row` (old and new cell files alike)."""
    cells = []
    for path in sorted(cells_dir.glob("*.json")):
        try:
            cell = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written file cannot exist (atomic writes), but never crash the report
        cells.append({**cell, "rows": [cell_row(r) for r in cell.get("rows", [])]})
    return cells


def shown_command(script: str, argv: list[str]) -> str:
    """The command as a report prints it, to be run from the repository root: paths inside the
    repository relative to it (an absolute path names one machine's checkout), and the thread
    setting the grid ran under."""
    def shown(arg: str) -> str:
        path = Path(arg)
        if path.is_absolute() and path.resolve().is_relative_to(REPO):
            return str(path.resolve().relative_to(REPO))
        return arg

    threads = os.environ.get("OMP_NUM_THREADS")
    return ((f"OMP_NUM_THREADS={threads} " if threads else "") + f"python {script} "
            + " ".join(shlex.quote(shown(a)) for a in argv))


def _validation_size(cell: dict) -> int:
    """The cell's validation_size: its settings, or its recorded `--set` values (cells written
    before settings showed that key)."""
    if "validation_size" in cell.get("settings", {}):
        return int(cell["settings"]["validation_size"])
    given = [o.split("=", 1)[1] for o in cell.get("overrides") or [] if o.split("=", 1)[0].strip() == "validation_size"]
    return int(given[-1]) if given else 0


def rebuild_report(root: Path, name: str, strategies: list[str], seeds: list[int], command: str) -> None:
    """curves.csv, learning_curves.png and README.md from whatever cells exist."""
    from tidal.report import counterpart_table, labels_to_reach_table, markdown_table, plot_curves, summarize

    cells = load_cells(root / "cells")
    rows = [r for c in cells for r in c["rows"]]
    with open(root / "curves.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["strategy"], int(r["seed"]), int(r["cycle"]))):
            writer.writerow({**r, "accuracy": f"{float(r['accuracy']):.6f}"})
    os.replace(root / "curves.csv.tmp", root / "curves.csv")
    settings = cells[0]["settings"] if cells else {}
    split = "validation" if cells and _validation_size(cells[0]) else "test"
    summary = summarize(rows, split) if rows else None
    if summary:
        plot_curves(summary, root / "learning_curves.png", title=f"{name}: learning curves")

    done = {(c["strategy"], int(c["seed"])) for c in cells}
    expected = [(s, sd) for s in strategies for sd in seeds]
    missing = [cell_name(s, sd) for s, sd in expected if (s, sd) not in done]
    lines = [f"# AL benchmark `{name}`", "",
             "Produced by (from the repository root):", "", "```bash", command, "```", "",
             f"Cells finished: **{len(done & set(expected))} of {len(expected)}** "
             f"({len(strategies)} strategies × {len(seeds)} seeds)"
             + (f"; not finished: {', '.join(missing)}." if missing else "."), ""]
    extra = sorted(done - set(expected))
    if extra:
        lines += [f"Also present from earlier runs of this folder: "
                  f"{', '.join(cell_name(s, sd) for s, sd in extra)}.", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + ".", ""]
    if summary:
        lines += [f"## {split.capitalize()} accuracy and AUBC", "", markdown_table(summary),
                  "Paired gain: per seed, the strategy's AUBC minus random's AUBC on that seed (same initial "
                  "labeled set and training seed); mean ± 95 % Student t interval over the seeds both have.",
                  "", "![learning curves](learning_curves.png)", "",
                  "## Labels to reach random's final accuracy", "", labels_to_reach_table(summary)]
        counterparts = counterpart_table(summary)
        if counterparts:
            lines += ["## TiDAL against the plain score it builds on", "", counterparts]
        over_entropy = counterpart_table(summary, [(s, "entropy") for s in summary["strategies"] if s != "entropy"])
        if over_entropy:
            # random is the floor every strategy should clear; entropy is the plain uncertainty
            # score a user would try first, so a strategy worth its cost has to beat it too
            lines += ["## Paired gains over entropy", "", over_entropy]
        queried = [r for r in rows if int(r["cycle"]) > 0]
        if queried:
            # Cycle 0 is trained on the random initial set before any strategy chose a label; it
            # still differs between strategies that train an auxiliary module with the backbone
            # (TiDAL's TD module, Learning Loss's loss module), because that joint training changes
            # the backbone. The AUBC over cycles ≥ 1 only counts models trained on chosen labels.
            lines += ["## AUBC over the queried budgets only (cycles ≥ 1)", "",
                      "Cycle 0 is the same random initial set for every strategy, but strategies that train an "
                      "auxiliary module jointly with the backbone (tidal-*, lloss) get a different cycle-0 model. "
                      "This table leaves cycle 0 out, so it compares only models trained on labels the "
                      "strategies chose.", "", markdown_table(summarize(queried, split))]
    # Wall time per cell: strategy rows × seed columns.
    all_seeds = sorted({int(c["seed"]) for c in cells} | set(seeds))
    all_strats = list(dict.fromkeys([*strategies, *sorted({c["strategy"] for c in cells})]))
    wall = {(c["strategy"], int(c["seed"])): c for c in cells}
    lines += ["## Wall time per cell (s)", "",
              "| strategy | " + " | ".join(f"seed {s}" for s in all_seeds) + " |",
              "|---" * (len(all_seeds) + 1) + "|"]
    for s in all_strats:
        cells_text = []
        for sd in all_seeds:
            c = wall.get((s, sd))
            cells_text.append("–" if c is None else f"{c['wall_s']:.1f}" + ("*" if c.get("resumed_from_workspace")
                                                                               else ""))
        lines.append(f"| {s} | " + " | ".join(cells_text) + " |")
    total = sum(c["wall_s"] for c in cells)
    lines += ["", f"Total {total:.0f} s over {len(cells)} cells (mean {total / max(len(cells), 1):.1f} s); "
              "each includes the Prefect flow and MLflow logging (one model logged per cycle); the first "
              "cell of a process also starts the Prefect temporary server. `*`: the cell resumed from a "
              "workspace left by an interrupted run, so its time covers only the rest.",
              "", f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
              f"{platform.python_version()}, torch {_torch_version()}; CPU runs are deterministic "
              "(same command, same numbers), times depend on load.", "",
              "Files: `curves.csv` (strategy, seed, cycle, n_labeled, accuracy), `cells/*.json` (one per "
              "finished cell), `learning_curves.png`. Not committed: `mlflow.db`, `runs/`, `mlartifacts/`.", ""]
    _atomic_write(root / "README.md", "\n".join(lines))


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover
        return "?"


def main(argv: list[str] | None = None, configure_env: bool = True) -> dict[str, Any]:
    """Run the grid; return {ran, skipped, root}. `configure_env=False` keeps the process's own
    Prefect API (e.g. a test harness) and only points MLflow at the results folder."""
    args = parse_args(argv)
    root = Path(args.out).resolve() / args.name
    root.mkdir(parents=True, exist_ok=True)
    if configure_env:
        configure_environment(root)
    gitignore = Path(args.out).resolve() / ".gitignore"
    if not gitignore.exists():
        _atomic_write(gitignore, "# MLflow stores, workspaces and Prefect homes of benchmark grids: large, "
                                 "rebuilt by the scripts\n*.db\nruns/\nmlartifacts/\nprefect-home/\n*.tmp\n")
    strategies, seeds = _csv_list(args.strategies), [int(s) for s in _csv_list(args.seeds)]
    params_path = None if args.params.lower() == "none" else args.params

    from tidal.config import load_params
    from tidal.strategies import STRATEGIES

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    overrides = [*args.overrides, *_resolve_data_root(params_path, args.overrides)]
    load_params(params_path, overrides)  # a bad --set fails before any cell runs

    command = shown_command("benchmarks/al_curves.py", argv if argv is not None else sys.argv[1:])
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cells_dir = root / "cells"
    ran, skipped = [], []
    try:
        for seed in seeds:  # seed-major: a partial grid still has every strategy on the first seeds
            for strategy in strategies:
                path = cells_dir / f"{cell_name(strategy, seed)}.json"
                if path.is_file():
                    saved = json.loads(path.read_text())
                    if _identity(saved.get("overrides") or []) != _identity(overrides):
                        raise SystemExit(f"{path} was run with --set {saved.get('overrides')}, now {overrides}: "
                                         f"use another --name (or delete {root}) to change settings")
                    skipped.append(path.stem)
                    continue
                print(f"[al_curves] {args.name}: cell {strategy} seed {seed} ...", flush=True)
                record = run_cell(root, args.name, strategy, seed, params_path, overrides)
                _atomic_write(path, json.dumps(record, indent=1) + "\n")
                ran.append(path.stem)
                accs = " ".join(f"{r['accuracy']:.4f}" for r in record["rows"])
                print(f"[al_curves] {args.name}: {path.stem} done in {record['wall_s']:.1f} s: {accs}", flush=True)
                rebuild_report(root, args.name, strategies, seeds, command)
        rebuild_report(root, args.name, strategies, seeds, command)
    finally:
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    print(f"[al_curves] {args.name}: ran {len(ran)}, skipped {len(skipped)} finished cells; "
          f"results in {root}", flush=True)
    return {"ran": ran, "skipped": skipped, "root": str(root)}


if __name__ == "__main__":
    from tidal.signals import exit_on_sigterm

    exit_on_sigterm()  # `kill PID` stops the grid and its Prefect server; the cell resumes later
    main()
