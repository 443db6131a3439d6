"""The same active-learning experiment through baal 2.1's loop and through ours, alternating in one
process: wall time per cycle and test accuracy of each, and the ratio baal / ours.

    make bench-deps                                          # baal and its import needs, pinned, --no-deps
    python benchmarks/vs_baal.py --rounds 3 --threads 1      # the embedded default (params.yaml: digits)
    python benchmarks/vs_baal.py --rounds 1 --set cycles=1 --set train.epochs=1   # a quick look

`--threads 1` is what results/vs_baal/ was measured with: on the shared 2-core development
machine, torch's default of 2 threads was oversubscribed by the other jobs, which made every epoch
5-20x slower and very noisy (that first run is kept in results/vs_baal/threads2/).

The experiment is the default one (digits pool, small-cnn, 100 initial labels + 100 per cycle,
5 cycles, 500 random unlabeled candidates scored per cycle, 40 epochs, SGD 0.05 / 0.9 / 5e-4,
batch 64, lr x0.1 at epoch 30, random crop with padding 1, no flip) with strategy `entropy`:

- ours: `tidal.bench.run_trial` (the library's pipeline steps, tracking off). A cycle is train +
  evaluate + score + select + export + commit (`tidal.pipeline.run_cycle`'s step times).
- baal: `ActiveLearningDataset` over the same pool with the same initial ids, `ModelWrapper`
  around the same SmallCNN (logits only), `ActiveLearningLoop` with the `Entropy` heuristic,
  `max_sample` = subset_size, `query_size` = budget. The crop is done baal's way: a per-sample
  torchvision transform in the dataset, batched by a DataLoader. A cycle is train + test +
  `loop.step()`.

Round r uses seed r for both libraries (the same initial ids); the order of the two alternates
between rounds so that a load change on a shared machine falls on both. Writes results.json,
README.md and vs_baal.png under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tidal import inputs, pipeline  # noqa: E402
from tidal.config import load_params  # noqa: E402
from tidal.data.dataset import Dataset  # noqa: E402
from tidal.device import set_deterministic  # noqa: E402
from tidal.experiment import initial_labeled, load_state  # noqa: E402
from tidal.models import build_backbone  # noqa: E402

LIBRARIES = ("ours", "baal")
BAAL_INSTALL = "make bench-deps (pip install --no-deps with the pins of the `bench` extra in pyproject.toml)"


def import_baal() -> Any:
    """baal, or an ImportError that says how to install it (it is only in the `bench` extra)."""
    try:
        import baal
        import baal.active
        import baal.active.heuristics
        import baal.modelwrapper
    except ImportError as exc:
        raise ImportError(f"benchmarks/vs_baal.py needs baal 2.1, which is not importable here ({exc}). "
                          f"Install it with: {BAAL_INSTALL}") from exc
    import logging

    import structlog

    # baal logs every train/test/predict call at INFO to stdout; keep warnings only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return baal


def experiment_params(seed: int, overrides: list[str]) -> dict[str, Any]:
    """The params both sides run with: exactly what run_trial loads for the same overrides."""
    return load_params(None, ["tracking=false", "strategy=entropy", "device=cpu", f"seed={seed}",
                              f"data_root={REPO / 'data'}", *overrides])


# --- ours ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _counted_candidates(candidates: list[int]) -> Iterator[None]:
    """Record how many candidates each score step draws. Restored on exit."""
    candidate_positions = pipeline.candidate_positions

    def counted_candidate_positions(*args: Any, **kwargs: Any) -> Any:
        positions = candidate_positions(*args, **kwargs)
        candidates.append(len(positions))
        return positions

    pipeline.candidate_positions = counted_candidate_positions
    try:
        yield
    finally:
        pipeline.candidate_positions = candidate_positions


def run_ours(params: dict[str, Any], overrides: list[str], work: Path, name: str) -> dict[str, Any]:
    """One complete experiment through `tidal.bench.run_trial`, in a fresh workspace."""
    from tidal.bench import run_trial

    runs_dir = work / "runs"
    shutil.rmtree(runs_dir / name, ignore_errors=True)
    candidates: list[int] = []
    t0 = time.perf_counter()
    with _counted_candidates(candidates):
        record = run_trial(["strategy=entropy", "device=cpu", f"seed={params['seed']}",
                            f"data_root={params['data_root']}", *overrides, f"runs_dir={runs_dir}",
                            f"experiment={name}"], work / name)
    end = time.perf_counter()
    state = load_state({**params, "runs_dir": str(runs_dir), "experiment": name})
    cycles = []
    for c, n_candidates in zip(record["cycles"], candidates):
        # tidal.bench calls it `accuracy`; this benchmark's records (and results.json) keep `test_accuracy`
        cycles.append({"cycle": c["cycle"], "n_labeled": c["n_labeled"], "test_accuracy": c["accuracy"],
                       "cycle_s": c["train_s"] + c["eval_s"] + c["score_s"] + c["commit_s"],
                       "train_s": c["train_s"], "eval_s": c["eval_s"], "score_s": c["score_s"],
                       "other_s": c["commit_s"], "n_candidates": n_candidates})
    return {"library": "ours", "total_s": end - t0, "initial_ids": list(state["labeled"])[:params["initial_size"]],
            "cycles": cycles}


# --- baal ----------------------------------------------------------------------------------------

class LogitsOnly(nn.Module):
    """Our backbones return (logits, stage features); baal's wrapper and criterion expect logits."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[0]


class TensorImages(torch.utils.data.Dataset):
    """uint8 N×C×H×W images and labels, with a per-sample `transform` (which baal's pool replaces)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def baal_transforms(params: dict[str, Any], data: Dataset) -> tuple[Callable, Callable]:
    """Train (random crop, zero padding crop_pad) and test transforms, the same maths as tidal.train:
    uint8 -> [0, 1], crop, then (x - 0.5) / 0.5."""
    from torchvision import transforms as T

    channels, height, width = data.pool_images.shape[1:]
    norm = T.Normalize((0.5,) * channels, (0.5,) * channels)
    to_float = T.ConvertImageDtype(torch.float32)
    train = [to_float]
    if params["train"]["crop_pad"] > 0:
        train.append(T.RandomCrop((height, width), padding=params["train"]["crop_pad"]))
    if params["train"]["hflip"]:
        train.append(T.RandomHorizontalFlip())
    return T.Compose([*train, norm]), T.Compose([to_float, norm])


def _train_with_milestones(wrapper: Any, optimizer: torch.optim.Optimizer, dataset: Any, epochs: int,
                           milestones: list[int]) -> None:
    """ModelWrapper has no LR-scheduler hook: train in segments, lr x0.1 at each milestone
    (the same schedule as MultiStepLR(gamma=0.1) stepped once per epoch)."""
    done = 0
    for end in [*sorted(m for m in milestones if 0 < m < epochs), epochs]:
        wrapper.args.epoch = end - done
        wrapper.train_on_dataset(dataset)
        if end < epochs:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        done = end


def run_baal(params: dict[str, Any], workers: int = 0) -> dict[str, Any]:
    """One complete experiment through baal's active-learning loop."""
    import_baal()
    from baal.active import ActiveLearningDataset, ActiveLearningLoop
    from baal.active.heuristics import Entropy
    from baal.modelwrapper import ModelWrapper, TrainingArgs

    t0 = time.perf_counter()
    data = inputs.dataset_for(params)
    train_tf, test_tf = baal_transforms(params, data)
    pool = TensorImages(data.pool_images, data.pool_labels, train_tf)
    test = TensorImages(data.test_images, data.test_labels, test_tf)
    start_ids = initial_labeled(params, data)
    labelled = np.zeros(len(pool), dtype=bool)
    labelled[data.index_of(start_ids).numpy()] = True
    # pool_specifics: the pool (what is scored) is read without augmentation, as baal's docs say.
    al_dataset = ActiveLearningDataset(pool, labelled=labelled, pool_specifics={"transform": test_tf})
    np.random.seed(params["seed"])  # baal draws the max_sample candidates with np.random
    cfg = params["train"]
    wrapper: Any = None
    n_candidates: list[int] = []
    scoring_s: list[float] = []

    def get_probabilities(dataset: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        n_candidates.append(len(dataset))
        out = wrapper.predict_on_dataset(dataset, **kwargs)
        scoring_s.append(time.perf_counter() - started)
        return out

    loop = ActiveLearningLoop(al_dataset, get_probabilities, heuristic=Entropy(), query_size=params["budget"],
                              max_sample=params["subset_size"], iterations=1, verbose=False)
    cycles = []
    for cycle in range(params["cycles"]):
        c0 = time.perf_counter()
        n_labeled = int(al_dataset.n_labelled)
        # A fresh model and optimizer each cycle with the seed ours uses for that cycle (same init).
        torch.manual_seed(pipeline.cycle_seed(params["seed"], cycle))
        model = LogitsOnly(build_backbone(params["backbone"], data.in_channels, data.num_classes,
                                          dropout=params["dropout"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    weight_decay=cfg["weight_decay"])
        wrapper = ModelWrapper(model, TrainingArgs(optimizer=optimizer, batch_size=cfg["batch_size"], epoch=0,
                                                   use_cuda=False, workers=workers,
                                                   criterion=nn.CrossEntropyLoss()))
        _train_with_milestones(wrapper, optimizer, al_dataset, cfg["epochs"], cfg["milestones"])
        c1 = time.perf_counter()
        probs = wrapper.predict_on_dataset(test, iterations=1, verbose=False)  # N × C × iterations
        acc = float((probs[:, :, 0].argmax(1) == data.test_labels.numpy()).mean())
        c2 = time.perf_counter()
        loop.step()
        c3 = time.perf_counter()
        cycles.append({"cycle": cycle, "n_labeled": n_labeled, "test_accuracy": acc, "cycle_s": c3 - c0,
                       "train_s": c1 - c0, "eval_s": c2 - c1, "score_s": scoring_s[-1],
                       "other_s": (c3 - c2) - scoring_s[-1], "n_candidates": n_candidates[-1]})
        print(f"[baal] cycle {cycle}: {n_labeled} labels, acc {acc:.4f}, train {c1 - c0:.1f} s, "
              f"step {c3 - c2:.1f} s", flush=True)
    return {"library": "baal", "total_s": time.perf_counter() - t0, "initial_ids": start_ids, "cycles": cycles}


# --- where an epoch's time goes ---------------------------------------------------------------------

def profile_epoch(params: dict[str, Any], reps: int = 3, workers: int = 0) -> dict[str, Any]:
    """One training epoch on the largest labeled set of the experiment, split into its input
    pipeline alone (no model) and the whole epoch, for each library; median of `reps`, alternating.

    ours: tidal.train's batched crop on the uint8 tensor, then `train_cycle` for 1 epoch;
    baal: iterating its DataLoader (per-sample transform + collate), then `train_on_dataset`.
    """
    import_baal()
    from baal.active import ActiveLearningDataset
    from baal.modelwrapper import ModelWrapper, TrainingArgs
    from tidal.train import TrainConfig, augment, epoch_batches, normalize, to_float, train_cycle

    cfg = params["train"]
    n = params["initial_size"] + (params["cycles"] - 1) * params["budget"]
    data = inputs.dataset_for(params)
    ids = initial_labeled({**params, "initial_size": n}, data)
    pos = data.index_of(ids)
    images, labels = data.pool_images[pos], data.pool_labels[pos]
    train_tf, test_tf = baal_transforms(params, data)
    pool = TensorImages(data.pool_images, data.pool_labels, train_tf)
    labelled = np.zeros(len(pool), dtype=bool)
    labelled[pos.numpy()] = True
    al_dataset = ActiveLearningDataset(pool, labelled=labelled, pool_specifics={"transform": test_tf})
    one_epoch = TrainConfig.from_params({**cfg, "epochs": 1})

    def model() -> nn.Module:
        return build_backbone(params["backbone"], data.in_channels, data.num_classes, dropout=params["dropout"])

    def ours_input() -> None:
        x_all, gen = to_float(images), torch.Generator().manual_seed(0)
        for idx in epoch_batches(torch.randperm(n, generator=gen), cfg["batch_size"]):
            normalize(augment(x_all[idx], cfg["crop_pad"], cfg["hflip"], gen))

    def baal_input() -> None:
        for _ in torch.utils.data.DataLoader(al_dataset, cfg["batch_size"], True, num_workers=workers):
            pass

    def ours_epoch() -> None:
        train_cycle(model(), None, images, labels, one_epoch, torch.device("cpu"), 0)

    def baal_epoch() -> None:
        net = LogitsOnly(model())
        opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        ModelWrapper(net, TrainingArgs(optimizer=opt, batch_size=cfg["batch_size"], epoch=1, use_cuda=False,
                                       workers=workers, criterion=nn.CrossEntropyLoss())).train_on_dataset(al_dataset)

    parts = {"ours_input_s": ours_input, "baal_input_s": baal_input, "ours_epoch_s": ours_epoch,
             "baal_epoch_s": baal_epoch}
    times: dict[str, list[float]] = {k: [] for k in parts}
    load = os.getloadavg()[0]
    for r in range(reps):
        for name in (list(parts) if r % 2 == 0 else list(parts)[::-1]):
            t0 = time.perf_counter()
            parts[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n_labeled": n, "reps": reps, "load_avg_at_start": load, "seconds": times, "median_s": med,
            "ours_model_s": med["ours_epoch_s"] - med["ours_input_s"],
            "baal_model_s": med["baal_epoch_s"] - med["baal_input_s"]}


# --- the comparison ----------------------------------------------------------------------------------

Runner = Callable[[dict[str, Any], list[str], str], dict[str, Any]]


def measure(rounds: int, overrides: list[str], work: Path, threads: int, workers: int = 0,
            runners: dict[str, Runner] | None = None) -> dict[str, Any]:
    """rounds × {ours, baal}, the order alternating; round r uses seed r for both.

    One tiny run of each (1 cycle, 1 epoch) comes first and is not counted, so that neither side's
    first measured run pays for the process's lazy imports and first kernel calls.
    """
    torch.set_num_threads(threads)
    # Ours switches deterministic algorithms on in train_step (for the whole process); switching it
    # on before the first run puts both libraries under the same setting whatever the order.
    set_deterministic(torch.device("cpu"))
    runners = runners or {
        "ours": lambda p, o, tag: run_ours(p, o, work, f"ours-{tag}"),
        "baal": lambda p, o, tag: run_baal(p, workers),
    }
    warm = [*overrides, "cycles=1", "train.epochs=1"]
    for library in LIBRARIES:
        runners[library](experiment_params(0, warm), warm, "warm-up")
    runs = []
    for r in range(rounds):
        params = experiment_params(r, overrides)
        for library in (LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]):
            load = os.getloadavg()[0]
            result = runners[library](params, overrides, f"r{r}")
            runs.append({**result, "round": r, "seed": r, "load_avg_at_start": load})
            print(f"round {r}: {library} {result['total_s']:.1f} s", flush=True)
        ours, baal = (next(x for x in runs if x["round"] == r and x["library"] == lib) for lib in LIBRARIES)
        if ours["initial_ids"] != baal["initial_ids"]:
            raise RuntimeError(f"round {r}: the two libraries started from different labeled sets")
    return {"rounds": rounds, "overrides": overrides, "threads": threads, "baal_workers": workers,
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cycle: median wall seconds of each library over the rounds, their ratio, mean accuracy."""
    rows = []
    n_cycles = len(runs[0]["cycles"])
    for k in range(n_cycles):
        row: dict[str, Any] = {"cycle": k}
        for lib in LIBRARIES:
            cs = [run["cycles"][k] for run in runs if run["library"] == lib]
            row["n_labeled"] = cs[0]["n_labeled"]
            row[f"{lib}_s"] = statistics.median(c["cycle_s"] for c in cs)
            row[f"{lib}_acc"] = statistics.fmean(c["test_accuracy"] for c in cs)
            for part in ("train_s", "eval_s", "score_s", "other_s"):
                row[f"{lib}_{part}"] = statistics.median(c[part] for c in cs)
        row["ratio"] = row["baal_s"] / row["ours_s"]
        rows.append(row)
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    style = {"ours": ("C0", "o", "ours (tidal)"), "baal": ("C1", "s", "baal 2.1")}
    for run in result["runs"]:
        color, marker, name = style[run["library"]]
        label = name if run["round"] == 0 else None  # one legend entry per library
        x = [c["n_labeled"] for c in run["cycles"]]
        ax_t.plot(x, [c["cycle_s"] for c in run["cycles"]], marker=marker, color=color, alpha=0.7, label=label)
        ax_a.plot(x, [c["test_accuracy"] for c in run["cycles"]], marker=marker, color=color, alpha=0.7, label=label)
    ax_t.set(xlabel="labeled samples", ylabel="wall seconds per cycle", title="time per AL cycle (every round)")
    ax_a.set(xlabel="labeled samples", ylabel="test accuracy", title="test accuracy (one line per seed)")
    for ax in (ax_t, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, result: dict[str, Any], command: str) -> None:
    """results.json, vs_baal.png and README.md (rewritten on every run; notes.md, if present, is
    appended as the hand-written analysis)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    plot(result, out / "vs_baal.png")
    rows = result["summary"]
    runs = result["runs"]
    ratios = [b["total_s"] / o["total_s"] for o, b in
              ((next(x for x in runs if x["library"] == "ours" and x["round"] == r),
                next(x for x in runs if x["library"] == "baal" and x["round"] == r)) for r in range(result["rounds"]))]
    sum_ours = sum(r["ours_s"] for r in rows)
    sum_baal = sum(r["baal_s"] for r in rows)
    lines = [
        "# Speed and accuracy against baal 2.1", "", "Produced by (from the repository root):", "",
        "```bash", "make bench-deps   # once: baal and what it imports, pinned, --no-deps", command, "```", "",
        f"Same experiment through both libraries, strategy `entropy`, on CPU with "
        f"`torch.set_num_threads({result['threads']})` for both ({result['cpu_count']} cores, torch "
        f"{result['torch']}), baal's DataLoader with num_workers={result['baal_workers']}. {result['rounds']} "
        f"round(s); round r uses seed r for both libraries (the same initial labeled ids), and the order "
        f"alternates (ours first in even rounds). Time: median over the rounds of the wall seconds of the "
        f"cycle; accuracy: mean over the rounds (seeds).", "",
        "| cycle | labeled | ours (s) | baal (s) | baal / ours | ours acc | baal acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['cycle']} | {r['n_labeled']} | {r['ours_s']:.2f} | {r['baal_s']:.2f} | "
                     f"{r['ratio']:.2f}× | {r['ours_acc']:.4f} | {r['baal_acc']:.4f} |")
    aubc_o = statistics.fmean(r["ours_acc"] for r in rows)
    aubc_b = statistics.fmean(r["baal_acc"] for r in rows)
    lines += [
        f"| all | | {sum_ours:.2f} | {sum_baal:.2f} | {sum_baal / sum_ours:.2f}× | {aubc_o:.4f} (mean) | "
        f"{aubc_b:.4f} (mean) |", "",
        "Whole experiment per round (set-up included), baal / ours: "
        + ", ".join(f"{x:.2f}×" for x in ratios) + ".", "",
        "Where the time goes (median seconds per cycle; ours: train / evaluate / score 500 candidates / "
        "select + export + commit; baal: train_on_dataset / predict on the test split / predict on the "
        "500 candidates / the rest of `loop.step()`):", "",
        "| cycle | ours train | ours eval | ours score | ours other | baal train | baal eval | baal score | baal other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['cycle']} | " + " | ".join(f"{r[f'{lib}_{p}']:.2f}" for lib in LIBRARIES
                                                     for p in ("train_s", "eval_s", "score_s", "other_s")) + " |")
    per_round = "; ".join(f"round {x['round']} {x['library']}: " + ", ".join(f"{c['test_accuracy']:.4f}"
                                                                              for c in x["cycles"]) for x in runs)
    lines += [
        "", f"Accuracy of every run, by cycle: {per_round}.", "",
        "Caveats: the machine was shared (other CPU-heavy jobs ran at the same time; the 1-minute load "
        "average at the start of each run is in results.json), so absolute seconds are noisy; the ratio "
        "comes from the two libraries alternating in one process. Accuracy comes from "
        f"{result['rounds']} seed(s) on a 359-image test split.", "",
        "![time per cycle and accuracy](vs_baal.png)", "",
    ]
    prof = result.get("epoch_profile")
    if prof:
        m = prof["median_s"]
        lines += [
            f"One training epoch on {prof['n_labeled']} labeled samples (the last cycle's set), median of "
            f"{prof['reps']} alternating runs (`--profile-only` reruns this alone):", "",
            "| | input pipeline alone (s) | whole epoch (s) | the rest: model forward/backward/step, loop (s) |",
            "|---|---|---|---|",
            f"| ours | {m['ours_input_s']:.3f} | {m['ours_epoch_s']:.3f} | {prof['ours_model_s']:.3f} |",
            f"| baal | {m['baal_input_s']:.3f} | {m['baal_epoch_s']:.3f} | {prof['baal_model_s']:.3f} |",
            f"| baal / ours | {m['baal_input_s'] / m['ours_input_s']:.1f}× | "
            f"{m['baal_epoch_s'] / m['ours_epoch_s']:.2f}× | {prof['baal_model_s'] / prof['ours_model_s']:.2f}× |", "",
        ]
    notes = out / "notes.md"
    if notes.is_file():
        lines += [notes.read_text()]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads for both libraries (default: torch's default here)")
    p.add_argument("--baal-workers", type=int, default=0, help="baal's DataLoader num_workers")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vs_baal"))
    p.add_argument("--profile-only", action="store_true",
                   help="only (re)measure the one-epoch profile and add it to an existing --out/results.json")
    args = p.parse_args(argv)
    try:
        import_baal()  # fail before any work when the extra is missing
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    os.environ.setdefault("CI", "1")  # no progress bars in the log
    torch.set_num_threads(args.threads)
    if args.profile_only:
        result = json.loads((out / "results.json").read_text())
        command = result.pop("command")
        torch.set_num_threads(result["threads"])  # the threads the rounds ran with, not --threads
        set_deterministic(torch.device("cpu"))
        params = experiment_params(0, result["overrides"])
        result["epoch_profile"] = profile_epoch(params, workers=result["baal_workers"])
    else:
        command = "python benchmarks/vs_baal.py " + " ".join(
            [f"--rounds {args.rounds}", f"--threads {args.threads}", f"--baal-workers {args.baal_workers}",
             *(f"--set {shlex.quote(o)}" for o in args.overrides)])
        result = measure(args.rounds, args.overrides, out / "work", args.threads, args.baal_workers)
        result["epoch_profile"] = profile_epoch(experiment_params(0, args.overrides), workers=args.baal_workers)
    write_report(out, result, command)
    print((out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
