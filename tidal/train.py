"""One cycle's training: CE(f(x), y) + λ·(auxiliary module's loss), with batched augmentation.

The auxiliary module is TiDAL's TD predictor (λ·KL(p̄ ‖ p̃), with the TD recorder) or Learning
Loss's loss predictor (λ·margin ranking loss); each is an `AuxTask` over one shared loop.

Data lives on the training device as uint8; each batch is cropped and flipped there, so
there is no per-sample Python or PIL work in the loop. Loss and accuracy are accumulated on
the device and read once per epoch.

On CUDA the forward passes run under bf16 autocast (losses in fp32) on channels_last tensors,
optionally through torch.compile; on CPU none of that (`precision_context`, `prepare_model`).

With a `DistributedContext` the same loop runs on each rank of a data-parallel run (see
tidal/train_ddp.py): every rank draws the same permutation and augmentation for each global
batch and trains on its part (`DistributedContext.shard`), the models are wrapped in
DistributedDataParallel, and losses are scaled so the averaged gradient is that of the global
batch's mean loss. Without one, nothing of this runs: the one-process path is unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tidal.dynamics import TDRecorder
from tidal.models.classifier import normalize
from tidal.models.loss_module import LossPredictor, loss_ranking_loss
from tidal.models.td_module import TDPredictor
from tidal.progress import progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: list[int]
    td_weight: float
    crop_pad: int
    hflip: bool
    lloss_weight: float = 1.0  # λ of Learning Loss's ranking loss
    lloss_detach_epoch: int = 120  # Learning Loss: features detached for epochs after this one
    compile: str | bool = False  # CUDA only: false, "default" or "reduce-overhead"
    min_steps: int = 0  # a cycle takes at least this many optimizer steps (epochs are raised to reach it)
    schedule: str = "multistep"  # "multistep" (×0.1 at each milestone) or "onecycle"
    warm_start: bool = False  # read by pipeline.train_step: start from the previous cycle's weights
    td_hidden: int = 128  # the TD module's width per stage (the reference's interm_dim)
    td_detach: bool = False  # the TD module reads detached features: its loss never reaches the backbone
    backbone_mode: str = "scratch"  # scratch, finetune or frozen (read by the pipeline)
    backbone_lr_scale: float = 0.1  # finetune: a pretrained trunk learns at lr × this

    @classmethod
    def from_params(cls, train: dict) -> "TrainConfig":
        return cls(**train)

    def for_labeled(self, num_samples: int) -> "TrainConfig":
        """This config for a labeled set of `num_samples`: epochs raised to give at least
        `min_steps` optimizer steps, and every epoch-counted setting (the milestones, Learning
        Loss's detach epoch) scaled by the same factor, so the schedule keeps its shape.

        A fixed epoch count gives a few dozen steps at 100 labels and thousands at 10,000; with
        `min_steps` a small labeled set is trained as long, in steps, as the recipe needs.
        """
        epochs = max(self.epochs, math.ceil(self.min_steps / steps_per_epoch(num_samples, self.batch_size)))
        if epochs == self.epochs:
            return self
        scale = epochs / self.epochs
        return replace(self, epochs=epochs, milestones=[round(m * scale) for m in self.milestones],
                       lloss_detach_epoch=round(self.lloss_detach_epoch * scale))


SCHEDULES = ("multistep", "onecycle")
ONECYCLE_WARMUP = 0.25  # fraction of the steps spent rising linearly to lr; then linear to 0
ONECYCLE_START = 0.1  # the warm-up starts at this fraction of lr


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (a tail batch of one sample is skipped, see `epoch_batches`)."""
    full, tail = divmod(num_samples, batch_size)
    return max(1, full + (1 if tail > 1 or (tail == 1 and full == 0) else 0))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate at optimizer step s (0-based) is lr × lr_factor(cfg, spe)(s).

    multistep: ×0.1 from each milestone epoch on (the same values as MultiStepLR stepped per
    epoch). onecycle: a linear rise from ONECYCLE_START·lr to lr over the first ONECYCLE_WARMUP
    of all steps, then a linear fall to 0 at the last step (airbench's and the fast CIFAR
    trainers' shape: most of the steps at a high rate, annealed to 0 at the end).
    """
    if cfg.schedule == "multistep":
        bounds = [m * steps_per_epoch for m in cfg.milestones]
        return lambda s: 0.1 ** sum(s >= b for b in bounds)
    if cfg.schedule == "onecycle":
        total = cfg.epochs * steps_per_epoch
        peak = max(1, round(ONECYCLE_WARMUP * total))

        def onecycle(s: int) -> float:
            if s < peak:
                return ONECYCLE_START + (1 - ONECYCLE_START) * s / peak
            return max(0.0, (total - s) / max(1, total - peak))
        return onecycle
    raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {cfg.schedule!r}")


def to_float(images_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 0..255 -> float 0..1 (normalization lives in `normalize`, after augmentation).
    `dtype` is the model's: float64 for a float64 model (tests/model/test_td_reference.py), so
    its input is not first rounded to float32."""
    return images_u8.to(dtype).div_(255.0)


def model_input(batch: torch.Tensor) -> torch.Tensor:
    """What the model reads: uint8 images normalized to floats; float rows (a frozen backbone's
    cached features, tidal.features) as they are."""
    return batch if batch.is_floating_point() else normalize(to_float(batch))


def loss_precision(x: torch.Tensor) -> torch.Tensor:
    """A model output as the losses take it: half precision (bf16 or fp16 from CUDA's autocast)
    raised to float32; float32 and float64 as they are (`.float()` would round a float64
    model's outputs to float32, and is a no-op on float32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def augment(x: torch.Tensor, crop_pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop (zero padding `crop_pad`) and horizontal flip, all on x's device."""
    b, c, h, w = x.shape
    if crop_pad > 0:
        padded = F.pad(x, (crop_pad,) * 4)
        offsets = torch.randint(0, 2 * crop_pad + 1, (2, b), generator=generator, device=x.device)
        rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded.gather(2, rows.expand(b, c, h, w + 2 * crop_pad)).gather(3, cols.expand(b, c, h, w))
    if hflip:
        flip = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run (torchrun + DistributedDataParallel)."""

    rank: int
    world_size: int
    group: Any = None  # the torch.distributed process group; None = the default (world) group

    def shard(self, n: int) -> torch.Tensor:
        """Positions, in a global batch of n, of the samples this rank trains on.

        Like idx[rank::world_size], but over the batch's two halves separately: Learning Loss's
        ranking loss pairs sample i with sample i + n//2, so each pair stays on one rank, in the
        same local order (first halves, then second halves). An odd batch's last sample, which
        is in no pair, goes to the first rank with fewer pairs. The shards are disjoint and
        cover the batch; a rank's shard is empty when the batch has fewer pairs than ranks.
        """
        half = n // 2
        pairs = torch.arange(half)[self.rank::self.world_size]
        parts = [pairs, pairs + half]
        if n % 2 and self.rank == half % self.world_size:
            parts.append(torch.tensor([n - 1]))
        return torch.cat(parts)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all ranks, in place (nothing to do in a run of one process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, group=self.group)


# One process trains as a data-parallel run of one rank: its shard is the whole batch, in order.
ONE_PROCESS = DistributedContext(rank=0, world_size=1)


def td_kl_loss(td_logits: torch.Tensor, td_target: torch.Tensor) -> torch.Tensor:
    """KL(p̄ ‖ p̃) with batchmean; p̄ (the recorded TD) is a fixed target."""
    return F.kl_div(F.log_softmax(td_logits, dim=1), td_target.detach(), reduction="batchmean")


# --- auxiliary modules: trained jointly with the backbone, each with its own loss -------------

class AuxTask:
    """A module trained with the backbone: total loss = CE + weight · loss(module output).

    The trainer gives the module its own SGD optimizer and schedule with the backbone's
    hyperparameters (as both papers do); a task only says how to run it and what its loss is.
    `metric` names the per-epoch mean of that loss in the history records.
    """

    metric = "aux_loss"

    def __init__(self, module: nn.Module, weight: float) -> None:
        self.module, self.weight = module, weight
        self.net: nn.Module = module  # what forward calls: the module, or its DDP wrapper

    def start(self, num_samples: int, device: torch.device) -> None:
        """Called once before the first epoch of a cycle."""

    def end_epoch(self, dist: DistributedContext) -> None:
        """Data-parallel runs only: called on every rank at the end of each epoch."""

    def terms(self, n: int) -> int:
        """How many terms the loss of a batch of n samples averages over (n for a per-sample mean)."""
        return n

    def forward(self, features: list[torch.Tensor], epoch: int) -> torch.Tensor:
        return self.net(features)

    def loss(self, out: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TDTask(AuxTask):
    """TiDAL: KL(p̄ ‖ p̃) between the recorded training dynamics and the TD module's prediction."""

    metric = "td_kl"

    def __init__(self, module: nn.Module, weight: float, detach: bool = False) -> None:
        super().__init__(module, weight)
        self.detach = detach

    def start(self, num_samples: int, device: torch.device) -> None:
        self.recorder = TDRecorder(num_samples, self.module.num_classes, device,
                                   dtype=next(self.module.parameters()).dtype)

    def forward(self, features, epoch):
        if self.detach:  # the module learns from the features, the backbone only from CE
            features = [f.detach() for f in features]
        return self.net(features)

    def end_epoch(self, dist):
        # Every rank's updates of this epoch, so the next epoch's targets include them all.
        self.recorder.combine(dist.all_reduce)

    def loss(self, out, idx, logits, y):
        return td_kl_loss(out, self.recorder.update(idx, torch.softmax(logits, dim=1)))


class LossPredTask(AuxTask):
    """Learning Loss: margin ranking loss between predicted and true per-sample CE losses.

    After epoch `detach_epoch` (1-based, read literally: 120 means epochs 121, 122, ... are
    detached, as in the paper's 200-epoch schedule; a schedule of at most `detach_epoch` epochs
    never detaches, 0 detaches from the start) the module reads detached features, so its loss
    no longer reaches the backbone; the module itself keeps training.
    """

    metric = "lloss_rank"

    def __init__(self, module: nn.Module, weight: float, detach_epoch: int, margin: float = 1.0) -> None:
        super().__init__(module, weight)
        self.detach_epoch, self.margin = detach_epoch, margin

    def terms(self, n):
        return n // 2  # the ranking loss averages over pairs (loss_ranking_loss)

    def forward(self, features, epoch):
        if epoch > self.detach_epoch:
            features = [f.detach() for f in features]
        return self.net(features)

    def loss(self, out, idx, logits, y):
        return loss_ranking_loss(out, F.cross_entropy(logits, y, reduction="none"), self.margin)


@dataclass(frozen=True)
class AuxModule:
    """One kind of auxiliary module a strategy trains beside the backbone (its `aux` names it)."""

    module: type[nn.Module]  # its class
    build: Callable[[list[int], int, "TrainConfig"], nn.Module]  # (backbone's stage channels, classes, config)
    task: Callable[[nn.Module, "TrainConfig"], AuxTask]  # how the trainer trains it
    checkpoint_key: str  # its weights' key in cycles/<k>/model.pt (the other kinds' keys hold None)
    output: str  # the ModelOutput field its scoring pass fills
    title: str  # what messages call it


# The one table of auxiliary modules: building, training, checkpointing and scoring read it.
AUX_MODULES: dict[str, AuxModule] = {
    "td": AuxModule(TDPredictor, lambda stages, classes, cfg: TDPredictor(stages, classes, cfg.td_hidden),
                    lambda m, cfg: TDTask(m, cfg.td_weight, cfg.td_detach), "td_module", "td_logits", "TD module"),
    "loss": AuxModule(LossPredictor, lambda stages, classes, cfg: LossPredictor(stages),
                      lambda m, cfg: LossPredTask(m, cfg.lloss_weight, cfg.lloss_detach_epoch), "lloss_module",
                      "pred_loss", "loss prediction module"),
}


def aux_kind(module: nn.Module) -> AuxModule:
    """The table's entry for an auxiliary module."""
    for kind in AUX_MODULES.values():
        if isinstance(module, kind.module):
            return kind
    raise TypeError(f"{type(module).__name__} is not an auxiliary module kind ({sorted(AUX_MODULES)})")


class NoAuxTask(AuxTask):
    """No auxiliary module: no parameters, no forward, a loss of zero (so CE + 0 is CE, exactly)."""

    metric = "td_kl"

    def __init__(self) -> None:
        super().__init__(nn.Module(), 0.0)

    def forward(self, features, epoch):
        return None

    def loss(self, out, idx, logits, y):
        return torch.zeros((), device=logits.device)


def aux_task(module: nn.Module | AuxTask | None, cfg: "TrainConfig") -> AuxTask:
    """The task that trains an auxiliary module (an AuxTask is used as it is; None: NoAuxTask)."""
    if module is None:
        return NoAuxTask()
    if isinstance(module, AuxTask):
        return module
    return aux_kind(module).task(module, cfg)


# --- the device's training path: GPU speed-ups, the CPU path unchanged ------------------------

COMPILE_MODES = ("default", "reduce-overhead")


def precision_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward passes on CUDA; on CPU nothing (deterministic fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last on CUDA (what its bf16 convolutions are fastest with); unchanged on CPU."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def prepare_model(model: nn.Module, device: torch.device, compile_mode: str | bool = False,
                  wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Move the model to the device; on CUDA also channels_last and, if asked, torch.compile.

    Returns the module to call (the compiled wrapper shares the model's parameters, so the
    model's own state_dict is what gets saved). On CPU, compile is refused: the CPU path is the
    deterministic fp32 reference, and inductor there needs a C++ toolchain and long compiles.
    `wrap` (the DDP wrapper) is applied before compiling, as torch.compile of DDP expects.
    """
    model.to(device)
    if device.type != "cuda":
        if compile_mode:
            raise ValueError(f"train.compile={compile_mode!r} is only supported on CUDA, but training "
                             f"runs on {device}; set train.compile=false")
        return wrap(model) if wrap is not None else model
    model.to(memory_format=torch.channels_last)
    net = wrap(model) if wrap is not None else model
    if compile_mode:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile must be false or one of {list(COMPILE_MODES)}, got {compile_mode!r}")
        return torch.compile(net, mode=compile_mode)
    return net


def _ddp(dist: DistributedContext, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """A DistributedDataParallel wrapper for this rank (gradients averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        ids = None
        if device.type == "cuda":
            ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # forward_sync_buffers=False: no broadcast of rank 0's buffers at every forward; the
        # global BatchNorm layers (SyncBatchNorm, GlobalBatchNorm2d) keep them equal already.
        return DistributedDataParallel(module, device_ids=ids, process_group=dist.group,
                                       forward_sync_buffers=False)
    return wrap


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of a data-parallel run, for CPU (gloo).

    nn.SyncBatchNorm has no CPU kernels (torch 2.14). Two autograd-aware all_reduces per layer:
    the per-channel sums and count give the global mean, then the sums of squared deviations from
    it give the global (biased) variance (two passes, as one process computes it, rather than
    E[x²] − E[x]², which cancels badly when the mean is large). Every rank normalizes with them,
    as one process does with the whole batch; the running statistics take the unbiased variance,
    as BatchNorm's do. Evaluation mode is plain BatchNorm. Same parameters and buffers, so
    checkpoints do not change.
    """

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        sums = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), x.new_full((1,), x.numel() / c)]), group=self.group)
        n = sums[-1]
        mean = sums[:c] / n
        centered = x - mean[None, :, None, None]
        var = all_reduce((centered * centered).sum(dim=(0, 2, 3)), group=self.group) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        scale = self.weight / torch.sqrt(var + self.eps)
        return centered * scale[None, :, None, None] + self.bias[None, :, None, None]


def global_batchnorm(module: nn.Module, group: Any = None) -> None:
    """Make every BatchNorm2d below `module` a GlobalBatchNorm2d, in place (same tensors)."""
    for sub in module.modules():
        if type(sub) is nn.BatchNorm2d:
            if not (sub.affine and sub.track_running_stats and sub.momentum is not None):
                raise ValueError("GlobalBatchNorm2d supports affine BatchNorm2d with running statistics "
                                 "and a momentum")
            sub.__class__ = GlobalBatchNorm2d
            sub.group = group


def _share(mean: torch.Tensor, outputs: torch.Tensor, local: int, total: int) -> torch.Tensor:
    """This rank's part of a global-batch mean: its own mean over `local` terms × local/total.

    With no terms here (an empty shard) the mean is 0/0; the part is then a zero that still
    reaches every parameter, since DDP needs each rank's gradient of each parameter.
    """
    if local == 0:
        return outputs.sum() * 0.0
    return mean * (local / total)


def _backbone_groups(backbone: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The backbone's parameter groups: one, or when fine-tuning a pretrained trunk (`net`) two,
    the trunk at lr × backbone_lr_scale so a few labels do not wash its features out."""
    trunk = getattr(backbone, "net", None)
    if cfg.backbone_mode != "finetune" or trunk is None:
        return [{"params": backbone.parameters()}]
    in_trunk = {id(p) for p in trunk.parameters()}
    # The head's group first: the epoch records report group 0's rate.
    return [{"params": [p for p in backbone.parameters() if id(p) not in in_trunk]},
            {"params": list(trunk.parameters()), "lr": cfg.lr * cfg.backbone_lr_scale}]


def epoch_batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """An epoch's shuffled positions `perm` cut into the batches the trainer steps on."""
    batches = list(perm.split(batch_size))
    # BatchNorm cannot train on a batch of one; such a tail batch waits for the next epoch.
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def train_cycle(
    backbone: nn.Module,
    aux: nn.Module | AuxTask | None,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "train",
    dist: DistributedContext | None = None,
) -> list[dict]:
    """Train backbone (and the auxiliary module, when given) from scratch on one labeled set.

    `aux` is a TD module (TiDAL), a `LossPredictor` (Learning Loss) or an `AuxTask`.
    The cycle runs `cfg.for_labeled(len(labels))`: at least `cfg.min_steps` optimizer steps.
    Returns one record per epoch: epoch, loss, accuracy, td_kl (0 without a TD module), lr (the
    rate of the epoch's last step), and the task's own metric (e.g. lloss_rank) when it is not td_kl.
    With `dist`, this is one rank of a data-parallel run (an initialized process group): the
    records are the global epoch's, the same on every rank. On CUDA the backbone's BatchNorm
    layers become SyncBatchNorm (in place: the caller's module keeps the trained layers), on
    CPU GlobalBatchNorm2d (in place, same tensors).
    """
    cfg = cfg.for_labeled(len(labels))  # at least cfg.min_steps steps; the schedule scaled to match
    task = aux_task(aux, cfg)
    dist = dist or ONE_PROCESS
    wrap = None
    if dist.world_size > 1:
        wrap = _ddp(dist, device)
        if device.type == "cuda":
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone, process_group=dist.group)
        else:  # SyncBatchNorm has no CPU kernels (torch 2.14: ValueError)
            global_batchnorm(backbone, dist.group)
    backbone.train()
    net = prepare_model(backbone, device, cfg.compile, wrap=wrap)
    task.module.to(device).train()
    if wrap is not None and any(True for _ in task.module.parameters()):
        task.net = wrap(task.module)  # DDP averages the module's gradients too
    task.start(len(labels), device)
    # The module is a second parameter group: the backbone's hyperparameters and schedule (as in
    # both papers, where it has its own optimizer with the same settings: the same updates).
    opt = torch.optim.SGD([*_backbone_groups(backbone, cfg), {"params": task.module.parameters()}], lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch(len(labels), cfg.batch_size)))
    # uint8 images are augmented and normalized per batch; float rows are a frozen backbone's
    # cached features (tidal.features), read as they are.
    is_images = not images_u8.is_floating_point()
    # In the parameters' dtype: float32 as always; float64 where a test trains a float64 model.
    dtype = next(backbone.parameters()).dtype
    images = to_float(images_u8.to(device), dtype) if is_images else images_u8.to(device)
    labels = labels.to(device)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    history = []
    epochs: Iterable[int] = range(1, cfg.epochs + 1)
    if dist.rank == 0:  # one progress bar per run, not one per rank
        epochs = progress(epochs, desc=desc, total=cfg.epochs)
    for epoch in epochs:
        sums = torch.zeros(3, device=device)  # loss, correct, aux loss; summed over samples
        seen = 0  # on the host: no copy to the device per batch
        for idx in epoch_batches(torch.randperm(len(labels), generator=order_gen).to(device), cfg.batch_size):
            n = len(idx)  # the global batch
            # Every rank draws the global batch's order and augmentation (the same draws as one
            # process); each keeps its own part.
            x = augment(images[idx], cfg.crop_pad, cfg.hflip, aug_gen) if is_images else images[idx]
            local = dist.shard(n).to(device)
            x, idx = prepare_input(normalize(x[local]) if is_images else x[local], device), idx[local]
            y = labels[idx]
            with precision_context(device):
                logits, features = net(x)
                aux_out = task.forward(features, epoch)
            logits = loss_precision(logits)  # losses in fp32 under autocast (a no-op on fp32 and fp64)
            aux_loss = task.loss(loss_precision(aux_out) if aux_out is not None else None, idx, logits, y)
            # This rank's part of the global batch's mean losses (shards may be uneven), times
            # world_size, since DDP averages the ranks' gradients: their mean is then the gradient
            # of the global batch's mean loss, as in one process (where both factors are 1).
            loss = _share(F.cross_entropy(logits, y), logits, len(idx), n)
            aux_loss = _share(aux_loss, aux_out if aux_out is not None else logits, task.terms(len(idx)), task.terms(n))
            loss = loss + task.weight * aux_loss
            opt.zero_grad(set_to_none=True)
            (loss * dist.world_size).backward()
            lr = opt.param_groups[0]["lr"]  # this step's rate (the epoch's record keeps the last)
            opt.step()
            sched.step()
            seen += n
            sums += torch.stack([loss.detach() * n, (logits.argmax(1) == y).sum().float(), aux_loss.detach() * n])
        dist.all_reduce(sums)  # each rank summed its parts: the global epoch's sums
        task.end_epoch(dist)
        loss_sum, correct, aux_sum = sums.tolist()
        record = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen, "td_kl": 0.0,
                  task.metric: aux_sum / seen, "lr": lr}
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"training loss became {record['loss']} at epoch {epoch}; "
                                   f"lower train.lr (now {cfg.lr}) or check the labels")
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history
