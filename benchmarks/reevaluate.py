"""A finished al_curves grid, evaluated again with other evaluation settings, without retraining.

    python benchmarks/reevaluate.py --grid cifar10-cpu-500 --name cifar10-cpu-500-flip \\
        --runs benchmarks/results/cifar10-cpu-500-s2/runs --set eval_hflip=true

Only the evaluation key may change (`--set eval_hflip=...`): training, scoring and selection
never read it, so each cycle's saved model (`cycles/<k>/model.pt` in
the cell's workspace) and labeled set are the ones a rerun of the grid with these settings
makes. For every cell of `<out>/<grid>/cells/`, each cycle's model is loaded and evaluated on the
cell's test split (or validation split) with the cell's own params plus `--set`; its one-view
accuracy must equal the accuracy the grid recorded (checked, so a model that is not the one the
grid evaluated is refused). The cells, with the new accuracies, go to `<out>/<name>/cells/` and
the report is al_curves.py's (`curves.csv`, `learning_curves.png`, `README.md`).

Workspaces are looked up as `<runs>/<experiment>` in the grid's own `runs/` and every `--runs`
folder (a grid whose seeds ran in two processes has two). Resumable: a cell with a file is
skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import al_curves  # noqa: E402

# score_batch_size is not one: another batch size may move the last float bits, and the check
# against the recorded accuracy would then refuse the right model.
EVALUATION_KEYS = {"eval_hflip"}
# A recorded accuracy is a float32 mean written as a Python float; the same model gives the same one.
SAME_ACCURACY = 1e-6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="the finished grid's --name")
    p.add_argument("--name", required=True, help="the re-evaluated grid's name (its results folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"evaluation settings: {', '.join(sorted(EVALUATION_KEYS))}")
    p.add_argument("--runs", action="append", default=[], help="another folder of the grid's workspaces")
    p.add_argument("--strategies", default="", help="comma-separated: only these cells, in this order (a second "
                   "process can take another part of the grid; the report counts every cell present)")
    p.add_argument("--out", default=str(al_curves.DEFAULT_OUT))
    return p.parse_args(argv)


def find_workspace(experiment: str, runs_dirs: list[Path]) -> Path:
    for runs in runs_dirs:
        if (runs / experiment / "state.json").is_file():
            return runs / experiment
    raise SystemExit(f"no workspace of {experiment} in {', '.join(str(r) for r in runs_dirs)}: "
                     "give the folder that holds it with --runs")


def reevaluate_cell(cell: dict[str, Any], workspace: Path, overrides: list[str]) -> dict[str, Any]:
    """The cell with each cycle's accuracy measured again under `overrides`."""
    from tidal.config import flatten, load_params
    from tidal.device import resolve_device
    from tidal.evaluate import mean_of_views, predict_logits
    from tidal.inputs import dataset_for
    from tidal.pipeline import load_models

    params = load_params(str(workspace / "params.yaml"), overrides)
    data = dataset_for(params)
    device = resolve_device(params["device"])  # as the grid's evaluate step
    rows = []
    for row in cell["rows"]:
        checkpoint = workspace / "cycles" / str(row["cycle"]) / "model.pt"
        backbone, _ = load_models(params, str(checkpoint), data)
        plain = predict_logits(backbone, data.test_images, device, params["score_batch_size"])
        recorded = float(row["accuracy"])
        if abs(float((plain.argmax(1) == data.test_labels).float().mean()) - recorded) > SAME_ACCURACY:
            raise SystemExit(f"{checkpoint} does not give the accuracy {recorded:.4f} the grid recorded for "
                             f"{cell['experiment']} cycle {row['cycle']}: not the model it evaluated")
        logits = plain
        if params["eval_hflip"]:  # predict_logits(hflip=True) without computing the one view twice
            logits = mean_of_views(plain, predict_logits(backbone, data.test_images.flip(-1), device,
                                                         params["score_batch_size"]))
        rows.append({**row, "accuracy": float((logits.argmax(1) == data.test_labels).float().mean())})
    shown = {k: v for k, v in flatten(params).items() if k in al_curves.SHOWN_KEYS}
    reevaluated = {"set": overrides, "recorded_accuracy": [r["accuracy"] for r in cell["rows"]],
                   "workspace": workspace.name, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {**cell, "rows": rows, "settings": {**cell.get("settings", {}), **shown}, "reevaluated": reevaluated}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    source, root = out / args.grid, out / args.name
    keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    if not keys or not keys <= EVALUATION_KEYS:
        raise SystemExit(f"--set takes evaluation keys only ({', '.join(sorted(EVALUATION_KEYS))}), got "
                         f"{sorted(keys) or 'none'}: other keys change training or selection (or, like "
                         "score_batch_size, the float bits the check against the recorded accuracy reads); "
                         "rerun the grid with al_curves.py")
    cells = al_curves.load_cells(source / "cells")
    if not cells:
        raise SystemExit(f"no finished cells in {source / 'cells'}")
    runs_dirs = [source / "runs", *(Path(r).resolve() for r in args.runs)]
    strategies = list(dict.fromkeys(c["strategy"] for c in cells))
    seeds = sorted({int(c["seed"]) for c in cells})
    if args.strategies:
        chosen = al_curves._csv_list(args.strategies)
        unknown = sorted(set(chosen) - set(strategies))
        if unknown:
            raise SystemExit(f"--strategies {unknown} have no cells in {source / 'cells'}; it has {strategies}")
        cells = sorted((c for c in cells if c["strategy"] in chosen),
                       key=lambda c: (chosen.index(c["strategy"]), int(c["seed"])))
    (root / "cells").mkdir(parents=True, exist_ok=True)  # after every check: bad input leaves nothing behind
    command = al_curves.shown_command("benchmarks/reevaluate.py", argv if argv is not None else sys.argv[1:])
    ran = []
    for cell in cells:
        path = root / "cells" / f"{al_curves.cell_name(cell['strategy'], int(cell['seed']))}.json"
        if path.is_file():
            continue
        record = reevaluate_cell(cell, find_workspace(cell["experiment"], runs_dirs), args.overrides)
        al_curves._atomic_write(path, json.dumps(record, indent=1) + "\n")
        ran.append(path.stem)
        print(f"[reevaluate] {path.stem}: " + " ".join(
            f"{a:.4f}->{r['accuracy']:.4f}" for a, r in zip(record["reevaluated"]["recorded_accuracy"],
                                                                 record["rows"])), flush=True)
    al_curves.rebuild_report(root, args.name, strategies, seeds, command)
    readme = root / "README.md"
    intro = (f"The models of the grid `{args.grid}` (benchmarks/results/{args.grid}/), evaluated again with "
             f"`{' '.join(args.overrides)}`: the same labeled sets and saved models (evaluation settings never "
             "reach training or selection), each cycle's one-view accuracy checked equal to the one the grid "
             "recorded. Wall times are the original cells'.")
    head, _, rest = readme.read_text().partition("\n\n")
    al_curves._atomic_write(readme, f"{head}\n\n{intro}\n\n{rest}")
    return {"ran": ran, "root": str(root)}


if __name__ == "__main__":
    main()
