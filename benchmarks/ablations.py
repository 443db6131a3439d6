"""TiDAL's settings against entropy and random, on a validation split of the pool (never the test split).

    OMP_NUM_THREADS=1 python benchmarks/ablations.py --name digits-val --seeds 0,1,2 --set validation_size=300

Each variant (a strategy and its `--set` values) is one `benchmarks/al_curves.py` grid of its own
under OUT/<name>/variants/<variant>/ (the real Prefect flow, tracking off, resumable: finished cells
are kept), all with the common `--set` values. `validation_size` > 0 makes every cell hold out that
many seeded pool samples and report accuracy on them instead of the test split; the same seed gives
every variant the same validation split, initial labels and training seed, so gains are paired.
OUT/<name>/README.md: per variant, AUBC (mean ± 95 % CI) and its paired gain over random and over
entropy, with the command.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import al_curves  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "ablations"
# variant name -> (strategy, its --set values). The paper's and the reference's TD module is
# 128 wide per stage and never detached (docs/architecture.md); the variants try the other ways.
VARIANTS = {
    "random": ("random", []),
    "entropy": ("entropy", []),
    "tidal-entropy": ("tidal-entropy", []),
    "tidal-entropy-warm": ("tidal-entropy", ["train.warm_start=true"]),
    "tidal-entropy-lambda0.5": ("tidal-entropy", ["train.td_weight=0.5"]),
    "tidal-entropy-lambda2": ("tidal-entropy", ["train.td_weight=2.0"]),
    "entropy-warm": ("entropy", ["train.warm_start=true"]),
    "tidal-entropy-detached": ("tidal-entropy", ["train.td_detach=true"]),
    "tidal-entropy-width32": ("tidal-entropy", ["train.td_hidden=32"]),
    "tidal-entropy-width512": ("tidal-entropy", ["train.td_hidden=512"]),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every cell")
    p.add_argument("--params", default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def aubc_by_seed(root: Path) -> dict[int, float]:
    """AUBC (mean accuracy over the cycles) per seed of one variant's finished cells."""
    out = {}
    for cell in al_curves.load_cells(root / "cells"):
        accs = [float(r["accuracy"]) for r in cell["rows"]]
        out[int(cell["seed"])] = sum(accs) / len(accs)
    return out


def cycle0_by_seed(root: Path) -> dict[int, float]:
    """Accuracy of the cycle-0 model (the initial random labels, the same for every variant of a
    seed) per seed: what joint training with an auxiliary module does to the backbone alone."""
    return {int(cell["seed"]): float(next(r for r in cell["rows"] if int(r["cycle"]) == 0)["accuracy"])
            for cell in al_curves.load_cells(root / "cells")}


def _fmt(values: list[float]) -> str:
    from tidal.report import mean_ci

    if not values:
        return "–"
    mean, half = mean_ci(values)
    return f"{mean:+.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}") + f" (n={len(values)})"


def write_report(out: Path, name: str, variants: list[str], command: str) -> str:
    from tidal.report import mean_ci

    aubc = {v: aubc_by_seed(out / "variants" / v) for v in variants}
    cycle0 = {v: cycle0_by_seed(out / "variants" / v) for v in variants}
    lines = [f"# Ablations `{name}` (validation split)", "", "Produced by (from the repository root):", "",
             "```bash", command, "```", "",
             "| variant | strategy and settings | seeds | AUBC (mean ± 95 % CI) | paired gain over random | "
             "paired gain over entropy | paired gain over its defaults | cycle-0 accuracy, paired vs random |",
             "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        strategy, sets = VARIANTS[v]
        seeds = sorted(aubc[v])
        mean, half = mean_ci(list(aubc[v].values())) if seeds else (math.nan, math.nan)
        score = "–" if not seeds else f"{mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}")
        gains = {}
        # "its defaults": the variant's strategy with no settings changed, the baseline a
        # default is kept or changed against.
        defaults = next((d for d, (st, st_sets) in VARIANTS.items() if st == strategy and not st_sets), None)
        for column, base in (("random", "random"), ("entropy", "entropy"), ("defaults", defaults)):
            shared = sorted(set(aubc[v]) & set(aubc.get(base, {})))
            gains[column] = "–" if v == base or base is None else _fmt([aubc[v][s] - aubc[base][s] for s in shared])
        shared0 = sorted(set(cycle0[v]) & set(cycle0.get("random", {})))
        first = "–" if not shared0 else f"{sum(cycle0[v][s] for s in shared0) / len(shared0):.4f}" + (
            "" if v == "random" else ", " + _fmt([cycle0[v][s] - cycle0["random"][s] for s in shared0]))
        lines.append(f"| {v} | `{strategy}` {' '.join(f'`{s}`' for s in sets)} | {len(seeds)} | {score} | "
                     f"{gains['random']} | {gains['entropy']} | {gains['defaults']} | {first} |")
    lines += ["", "AUBC: mean accuracy over the cycles on the validation split. Paired gain: per seed, the "
              "variant's AUBC minus the baseline's on that seed (same validation split, initial labels and "
              "training seed); mean ± 95 % Student t interval over the shared seeds; \"its defaults\": the same strategy "
              "with no setting changed (a default changes only where this interval excludes 0). Cycle-0 accuracy: the model "
              "trained on the initial random labels, which every variant of a seed shares, so the paired "
              "difference to random is what training beside the variant's module (and its settings) does to "
              "the backbone on the same labels. Each variant's learning curves and cell times: "
              "`variants/<variant>/README.md`.", ""]
    text = "\n".join(lines)
    (out / "README.md").write_text(text)
    return text


def main(argv: list[str] | None = None, configure_env: bool = True) -> str:
    """Run the missing cells of every variant and write the report; `configure_env=False` keeps the
    process's own Prefect API (a test harness), as in al_curves.main."""
    args = parse_args(argv)
    variants = al_curves._csv_list(args.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out) / args.name
    (out / "variants").mkdir(parents=True, exist_ok=True)
    command = al_curves.shown_command("benchmarks/ablations.py", argv if argv is not None else sys.argv[1:])
    for v in variants:
        strategy, sets = VARIANTS[v]
        grid = ["--name", v, "--strategies", strategy, "--seeds", args.seeds, "--out", str(out / "variants"),
                *sum((["--set", s] for s in ["tracking=false", *args.set, *sets]), [])]
        if args.params:
            grid += ["--params", args.params]
        al_curves.main(grid, configure_env=configure_env)
        write_report(out, args.name, variants, command)
    return write_report(out, args.name, variants, command)


if __name__ == "__main__":
    print(main())
