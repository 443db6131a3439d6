"""Speed micro-benchmarks (CPU by default): each prints a markdown table and writes
`benchmarks/results/speed/<name>.json`.

    python benchmarks/speed.py                      # all five, small sizes (a few minutes on 2 cores)
    python benchmarks/speed.py --only td_overhead --reps 5 --td-n 2000
    python benchmarks/speed.py --only scoring_memory --mem-sizes 10000,100000,1000000,3000000

- td_overhead: TiDAL training (TD module + TD recorder) vs the identical training whose recorder
  returns this batch's probabilities without the running-mean index write: isolates the
  recorder. Target: ratio ≤ 1.03.
- trainer_throughput: `tidal.train.train_cycle` (uint8 tensors, batched crop+flip) vs a plain
  DataLoader + torchvision PIL transforms loop, same SmallCNN, images, batch size and epochs.
  Target: ≥ 2×.
- scoring_throughput: `tidal.scoring.top_k_uncertain` (entropy) vs a bare forward loop over the
  same pool and batch size under inference_mode. Target: ≥ 0.9×.
- scoring_memory: peak memory of top_k_uncertain above its input, pools of 10k … 1M 1×8×8
  uint8 images, one subprocess per size. Target: flat.
- backbones: training (with the TD module) and inference images/s of cifar-cnn against
  small-cnn on the same CIFAR-10 images. Target: training ≥ 2×.

The two sides of every comparison run alternately (a b, b a, a b, …) in one process, so a
change of machine load hits both; the ratio is the result, absolute numbers depend on load.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("CI", "1")  # no progress bars inside timed loops

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tidal.dynamics import TDRecorder  # noqa: E402
from tidal.memory import status_kb  # noqa: E402
from tidal.models import SmallCNN, TDPredictor  # noqa: E402
from tidal.train import TDTask, TrainConfig, normalize, to_float, train_cycle  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "speed"
DEFAULT_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


# --- helpers --------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()}


def write_result(out: Path, name: str, result: dict, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "command": command, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine(), **result}
    path = out / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    print(result["table"])
    print(f"-> {path}\n", flush=True)


def cfg_for(epochs: int, batch_size: int, crop_pad: int, hflip: bool) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05, momentum=0.9, weight_decay=5e-4,
                       milestones=[max(epochs, 1) * 10], td_weight=1.0, crop_pad=crop_pad, hflip=hflip)


def synthetic(n: int, shape: tuple[int, int, int], classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=g))


def cifar_images(n: int, tarball: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Decode the first n train JPEGs of the CIFAR-10 tarball into uint8 N×3×32×32 (in memory),
    spread over the classes; synthetic uint8 images when the tarball is absent (said in `source`)."""
    if not tarball.is_file():
        x, y = synthetic(n, (3, 32, 32))
        return x, y, f"synthetic uint8 (tarball {tarball} absent)"
    import numpy as np
    from PIL import Image

    per_class: dict[str, list] = {}
    quota = -(-n // 10)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 4 or parts[-3] != "train":
                continue
            bucket = per_class.setdefault(parts[-2], [])
            if len(bucket) >= quota:
                if len(per_class) == 10 and all(len(b) >= quota for b in per_class.values()):
                    break
                continue
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            bucket.append(np.asarray(img, dtype=np.uint8))
    classes = sorted(per_class)
    pairs = [(a, c) for c in range(len(classes)) for a in per_class[classes[c]]][:n]
    x = torch.from_numpy(np.stack([a for a, _ in pairs])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([c for _, c in pairs])
    return x, y, f"CIFAR-10 train JPEGs decoded from {tarball.name} ({len(x)} images, {len(classes)} classes)"


def alternate(sides: dict[str, Callable[[], Any]], reps: int) -> dict[str, list]:
    """Run the sides alternately: order a b, then b a, ...; return each side's results."""
    names = list(sides)
    out: dict[str, list] = {k: [] for k in names}
    for rep in range(reps):
        for k in (names if rep % 2 == 0 else names[::-1]):
            out[k].append(sides[k]())
    return out


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- 1. TD recording overhead ---------------------------------------------------------------

class _NoWriteRecorder(TDRecorder):
    """The recorder minus its work: returns this batch's probabilities, writes nothing."""

    def update(self, indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs.detach().float()


class _NoRecordTDTask(TDTask):
    def start(self, num_samples: int, device: torch.device) -> None:
        self.recorder = _NoWriteRecorder(num_samples, self.module.num_classes, device)


def td_overhead(args) -> dict:
    device = torch.device("cpu")
    torch.use_deterministic_algorithms(True)  # as the pipeline trains on CPU
    rows, raw = [], {}
    configs = [("digits-sized 1×8×8", (1, 8, 8), args.td_n_small, 0, False),
               ("CIFAR-sized 3×32×32", (3, 32, 32), args.td_n, 4, True)]
    for label, shape, n, pad, flip in configs:
        x, y = synthetic(n, shape)
        cfg = cfg_for(args.td_epochs, args.batch_size, pad, flip)

        def run(task_cls) -> list[float]:
            torch.manual_seed(0)
            backbone = SmallCNN(shape[0], 10)
            task = task_cls(TDPredictor(backbone.stage_channels, 10), cfg.td_weight)
            stamps = [time.perf_counter()]
            train_cycle(backbone, task, x, y, cfg, device, seed=0, on_epoch=lambda r: stamps.append(time.perf_counter()))
            return [b - a for a, b in zip(stamps, stamps[1:])][1:]  # drop epoch 1 (warm-up, set-up)

        res = alternate({"tidal": lambda: run(TDTask), "no_write": lambda: run(_NoRecordTDTask)}, args.reps)
        med = {k: statistics.median([t for r in v for t in r]) for k, v in res.items()}
        # The recorder alone, on the same batches: one epoch's worth of updates.
        rec = TDRecorder(n, 10, device)
        probs = torch.softmax(torch.randn(n, 10), 1)
        perm_batches = torch.randperm(n).split(args.batch_size)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            for idx in perm_batches:
                rec.update(idx, probs[idx])
            times.append(time.perf_counter() - t0)
        update_s = statistics.median(times)
        ratio = med["tidal"] / med["no_write"]
        raw[label] = {"n": n, "epoch_s": res, "median_epoch_s": med, "ratio": ratio,
                      "recorder_updates_per_epoch_s": update_s}
        rows.append([label, n, f"{med['tidal'] * 1e3:.1f}", f"{med['no_write'] * 1e3:.1f}", f"{ratio:.3f}",
                     f"{update_s * 1e3:.2f} ({100 * update_s / med['tidal']:.2f} %)"])
    table = md_table(["images", "labeled N", "TiDAL epoch (ms, median)", "no-write epoch (ms, median)",
                      "ratio (target ≤ 1.03)", "recorder updates alone per epoch (ms, % of epoch)"], rows)
    table += (f"\nSmallCNN + TD module, batch {args.batch_size}, {args.td_epochs} epochs per run (epoch 1 dropped), "
              f"{args.reps} runs per side alternated; synthetic uint8 images and labels.\n")
    return {"table": table, "results": raw, "target": "ratio <= 1.03"}


# --- 2. trainer throughput -------------------------------------------------------------------

def trainer_throughput(args) -> dict:
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms
    from PIL import Image

    device = torch.device("cpu")
    torch.use_deterministic_algorithms(True)
    x, y, source = cifar_images(args.train_n, Path(args.tarball))
    cfg = cfg_for(args.train_epochs, args.batch_size, 4, True)
    pil_images = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

    class PilSet(Dataset):
        def __len__(self):
            return len(pil_images)

        def __getitem__(self, i):
            return tf(pil_images[i]), int(y[i])

    def ours() -> float:
        torch.manual_seed(0)
        model = SmallCNN(3, 10)
        t0 = time.perf_counter()
        train_cycle(model, None, x, y, cfg, device, seed=0)
        return len(x) * cfg.epochs / (time.perf_counter() - t0)

    def baseline() -> float:
        torch.manual_seed(0)
        model = SmallCNN(3, 10)
        loader = DataLoader(PilSet(), batch_size=cfg.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=False, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        model.train()
        t0 = time.perf_counter()
        seen = 0
        for _ in range(cfg.epochs):
            for xb, yb in loader:
                logits, _ = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(yb)
        return seen / (time.perf_counter() - t0)

    # The input pipelines alone (no model): where the two designs actually differ.
    def ours_data() -> float:
        from tidal.train import augment

        g = torch.Generator().manual_seed(1)
        images = to_float(x)
        t0 = time.perf_counter()
        for idx in torch.randperm(len(x)).split(cfg.batch_size):
            normalize(augment(images[idx], 4, True, g))
        return len(x) / (time.perf_counter() - t0)

    def baseline_data() -> float:
        loader = DataLoader(PilSet(), batch_size=cfg.batch_size, shuffle=True, num_workers=args.workers)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        return len(x) / (time.perf_counter() - t0)

    res = alternate({"ours": ours, "dataloader": baseline}, args.reps)
    data_res = alternate({"ours": ours_data, "dataloader": baseline_data}, max(args.reps, 3))
    med = {k: statistics.median(v) for k, v in res.items()}
    dmed = {k: statistics.median(v) for k, v in data_res.items()}
    rows = [["train SmallCNN (img/s)", f"{med['ours']:.0f}", f"{med['dataloader']:.0f}",
             f"{med['ours'] / med['dataloader']:.2f}×"],
            ["input pipeline alone, no model (img/s)", f"{dmed['ours']:.0f}", f"{dmed['dataloader']:.0f}",
             f"{dmed['ours'] / dmed['dataloader']:.2f}×"]]
    table = md_table(["what", "tidal train_cycle (tensors, batched crop+flip)",
                      f"DataLoader + PIL transforms (num_workers={args.workers})", "ratio (target ≥ 2×)"], rows)
    table += (f"\nImages: {source}. SmallCNN (width 32), batch {cfg.batch_size}, {cfg.epochs} epochs per run, "
              f"crop 32 pad 4 + flip, SGD; {args.reps} runs per side alternated, medians.\n")
    return {"table": table, "source": source, "results": {"train_img_s": res, "data_img_s": data_res},
            "median": {"train": med, "data": dmed}, "ratio_train": med["ours"] / med["dataloader"],
            "ratio_data": dmed["ours"] / dmed["dataloader"], "target": "ratio >= 2"}


# --- 3. scoring throughput -------------------------------------------------------------------

def scoring_throughput(args) -> dict:
    from tidal.scoring import top_k_uncertain
    from tidal.strategies.entropy import Entropy

    device = torch.device("cpu")
    rows, raw = [], {}
    x32, _, source = cifar_images(args.score_n_large, Path(args.tarball))
    pools = [("1×8×8 synthetic", synthetic(args.score_n_small, (1, 8, 8))[0]), (f"3×32×32 ({source})", x32)]
    for label, pool in pools:
        torch.manual_seed(0)
        model = SmallCNN(pool.shape[1], 10).eval()
        bs = args.score_batch_size

        def ours() -> float:
            t0 = time.perf_counter()
            top_k_uncertain(model, None, pool, Entropy(), args.k, device, bs)
            return len(pool) / (time.perf_counter() - t0)

        @torch.inference_mode()
        def bare() -> float:
            t0 = time.perf_counter()
            for s in range(0, len(pool), bs):
                model(normalize(to_float(pool[s:s + bs])))
            return len(pool) / (time.perf_counter() - t0)

        ours(), bare()  # warm-up
        res = alternate({"top_k_uncertain": ours, "bare": bare}, args.reps)
        med = {k: statistics.median(v) for k, v in res.items()}
        ratio = med["top_k_uncertain"] / med["bare"]
        raw[label] = {"n": len(pool), "img_s": res, "median": med, "ratio": ratio}
        rows.append([label, len(pool), f"{med['top_k_uncertain']:.0f}", f"{med['bare']:.0f}", f"{ratio:.3f}×"])
    table = md_table(["pool", "N", "top_k_uncertain (img/s)", "bare forward loop (img/s)", "ratio (target ≥ 0.9×)"],
                     rows)
    table += (f"\nSmallCNN (width 32), entropy, k={args.k}, batch {args.score_batch_size}, inference_mode, "
              f"{args.reps} runs per side alternated after one warm-up each, medians.\n")
    return {"table": table, "results": raw, "target": "ratio >= 0.9"}


# --- 4. scoring memory -----------------------------------------------------------------------

def memory_child(n: int, k: int, batch_size: int) -> None:
    """Subprocess: pool of n 1×8×8 uint8 images; print peak RSS of top_k_uncertain above its input."""
    from tidal.scoring import top_k_uncertain
    from tidal.strategies.entropy import Entropy

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = SmallCNN(1, 10).eval()
    pool = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    top_k_uncertain(model, None, pool[:batch_size * 2], Entropy(), k, device, batch_size)  # warm-up allocations
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        reset = False
    base_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    top_k_uncertain(model, None, pool, Entropy(), k, device, batch_size)
    wall = time.perf_counter() - t0
    peak_kb = status_kb("VmHWM")
    print(json.dumps({"n": n, "pool_mb": pool.numel() / 2**20, "base_rss_mb": base_kb / 1024,
                      "peak_rss_mb": peak_kb / 1024, "peak_above_input_mb": (peak_kb - base_kb) / 1024,
                      "peak_reset": reset, "wall_s": wall, "img_s": n / wall}))


def scoring_memory(args) -> dict:
    sizes = [int(s) for s in args.mem_sizes.split(",")]
    rows, raw = [], []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--k", str(args.k),
                              "--score-batch-size", str(args.score_batch_size)],
                             capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        raw.append(rec)
        rows.append([f"{n:,}", f"{rec['pool_mb']:.1f}", f"{rec['base_rss_mb']:.0f}", f"{rec['peak_rss_mb']:.0f}",
                     f"{rec['peak_above_input_mb']:.1f}", f"{rec['img_s']:.0f}"])
    table = md_table(["pool N (1×8×8 uint8)", "pool size (MB)", "RSS before scoring (MB, pool included)",
                      "peak RSS while scoring (MB)", "peak above input (MB)", "img/s"], rows)
    how = ("peak reset with /proc/self/clear_refs before scoring" if all(r["peak_reset"] for r in raw)
           else "peak = lifetime VmHWM (clear_refs unavailable): an upper bound")
    table += (f"\nOne subprocess per size; SmallCNN (width 32), entropy, k={args.k}, batch {args.score_batch_size}; "
              f"{how}; 'peak above input' = VmHWM − VmRSS just before the call (pool, model and warm-up "
              f"already allocated).\n")
    return {"table": table, "results": raw, "target": "peak above input flat in N"}


# --- 5. the CPU backbones: cifar-cnn against small-cnn -------------------------------------

def backbones(args) -> dict:
    """Training and scoring images/s of cifar-cnn against small-cnn, the same train_cycle
    (TD module included, as tidal-entropy trains), images, batch and epochs, alternated."""
    from tidal.evaluate import predict_logits
    from tidal.models import build_backbone

    device = torch.device("cpu")
    x, y, source = cifar_images(args.train_n, Path(args.tarball))
    cfg = cfg_for(args.train_epochs, 128, 4, True)

    def train_side(name: str) -> Callable[[], float]:
        def run() -> float:
            torch.manual_seed(0)
            model = build_backbone(name, 3, 10)
            t0 = time.perf_counter()
            train_cycle(model, TDPredictor(model.stage_channels, 10), x, y, cfg, device, seed=0)
            return len(x) * cfg.epochs / (time.perf_counter() - t0)
        return run

    def score_side(name: str) -> Callable[[], float]:
        model = build_backbone(name, 3, 10)

        def run() -> float:
            t0 = time.perf_counter()
            predict_logits(model, x, device, batch_size=args.score_batch_size)
            return len(x) / (time.perf_counter() - t0)
        return run

    names = ["small-cnn", "cifar-cnn"]
    train = alternate({n: train_side(n) for n in names}, args.reps)
    score = alternate({n: score_side(n) for n in names}, max(args.reps, 3))
    tmed = {k: statistics.median(v) for k, v in train.items()}
    smed = {k: statistics.median(v) for k, v in score.items()}
    params = {n: sum(p.numel() for p in build_backbone(n, 3, 10).parameters()) for n in names}
    rows = [[n, f"{params[n] / 1e3:.0f}k", f"{tmed[n]:.0f}", f"{tmed[n] / tmed['small-cnn']:.2f}×",
             f"{smed[n]:.0f}", f"{smed[n] / smed['small-cnn']:.2f}×"] for n in names]
    table = md_table(["backbone", "parameters", "train img/s (with TD module)", "vs small-cnn (target ≥ 2×)",
                      "inference img/s", "vs small-cnn"], rows)
    table += (f"\nImages: {source}. Batch 128, {cfg.epochs} epoch(s) per run, crop 32 pad 4 + flip, SGD, "
              f"{torch.get_num_threads()} threads; {args.reps} runs per side alternated, medians.\n")
    return {"table": table, "source": source, "results": {"train_img_s": train, "score_img_s": score},
            "median": {"train": tmed, "score": smed}, "ratio_train": tmed["cifar-cnn"] / tmed["small-cnn"],
            "ratio_score": smed["cifar-cnn"] / smed["small-cnn"], "target": "ratio_train >= 2"}


BENCHMARKS = {"td_overhead": td_overhead, "trainer_throughput": trainer_throughput,
              "scoring_throughput": scoring_throughput, "scoring_memory": scoring_memory,
              "backbones": backbones}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {list(BENCHMARKS)}")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--reps", type=int, default=3, help="runs per side, alternated (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64, as params.yaml)")
    p.add_argument("--td-n-small", type=int, default=1000, help="labeled images, 1×8×8 TD overhead run")
    p.add_argument("--td-n", type=int, default=256, help="labeled images, 3×32×32 TD overhead run")
    p.add_argument("--td-epochs", type=int, default=4, help="epochs per TD overhead run (first dropped)")
    p.add_argument("--train-n", type=int, default=2000, help="CIFAR JPEGs decoded for the trainer benchmark")
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="DataLoader num_workers of the baseline (default 0)")
    p.add_argument("--tarball", default=str(DEFAULT_TARBALL))
    p.add_argument("--score-n-small", type=int, default=20000, help="1×8×8 pool for scoring throughput")
    p.add_argument("--score-n-large", type=int, default=2000, help="3×32×32 pool for scoring throughput")
    p.add_argument("--score-batch-size", type=int, default=512)
    p.add_argument("--k", type=int, default=100, help="top-k kept while scoring")
    p.add_argument("--mem-sizes", default="10000,100000,1000000")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.k, args.score_batch_size)
        return
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.only.split(","):
        name = name.strip()
        print(f"## {name}\n", flush=True)
        t0 = time.perf_counter()
        result = BENCHMARKS[name](args)
        result["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        write_result(Path(args.out), name, result, command.strip())


if __name__ == "__main__":
    main()
