"""Our TD target, TD module and KL loss against the TiDAL reference code's numbers on one fixed input, in float64.

tests/fixtures/td_reference.json holds what the training loop of https://github.com/hyperconnect/TiDAL
(train_test/train_test.py:train, models/resnet.py:ResNet18, models/query_models.py:TDNet; the
commit and the script are in its "made_by") computed in float64 from our seeded initial weights
on 8 fixed images: per optimizer step, the batch's TD target p̄, the TD module's logits, the
backbone's logits and the KL loss. This test does not import the reference: it reruns our
train_cycle on the same setup, the same float32 weights widened exactly to float64 (train_cycle
feeds a model its parameters' dtype), and compares every step within `tolerances`, derived from
float64 rounding (tests/rounding.py at u = 2^-53: the additions whose order another machine,
kernel or thread count may change, over the steps taken), never from the differences one machine
showed, so it passes on any x86 CPU.

Why float64. The worst case is 2·u·(88,417 + k·183,618)·M (`chain_terms`, M ≈ 10 the output
layer's absolute sum), 5e-11 to 3e-9 here. In float32 (u = 2^-24, what this test compared until
the fixture was remade) the same derivation gives 1e-2 and more, and could not be tighter on every
machine: ResNet-18's ReLUs make float32 training jump at its rounding level (one float of
difference in the initial weights moved the step-5 logits 1.4e-3), as far as λ ±1 % or a
detached module input move them. In float64 every such change is 2e3 to 6e8 times the tolerance
(worst |ours − reference| / tolerance over the steps and the four quantities, each change made
for one run by `.venv/bin/python tests/fixtures/td_reference_mutations.py`):
    unchanged 8.7e-6 | λ +1 % 2.8e5 | λ −1 % 2.7e5 | module input detached 4.2e6 |
    KL(p̃ ‖ p̄) for KL(p̄ ‖ p̃) 4.6e7 | reduction "mean" for "batchmean" 6.5e8 | p̄ the latest p 6.4e7 |
    SGD momentum 0.8 for 0.9 3.7e7 | no weight decay 1.9e3.
The unchanged run's worst ratio, on the 2-core AMD EPYC development machine (AVX-512, torch 2.14.1
CPU) at 1 and 2 torch threads: 8.7e-6 as it is; 8.7e-6 with ATen, oneDNN and MKL at AVX2 (what an
x86 CPU without AVX-512 runs: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2); 1.4e-5 with none of them vectorized (ATEN_CPU_CAPABILITY=default,
ONEDNN_MAX_CPU_ISA=SSE41, MKL_ENABLE_INSTRUCTIONS=SSE4_2).

The weights are torch's default initialization's range on a 2^-24 grid (`grid_init`), not torch's
own draw, which is not the same on every x86 CPU: at ATEN_CPU_CAPABILITY=default (an x86 CPU
without AVX2) half of ResNet-18's weights come out one float32 step (up to 1.5e-8) from the AVX2
and AVX-512 draw, and with those weights ours was 1.9e3 times the float64 tolerance from the
fixture. Integers and their products with a power of two are exact everywhere; `input_checksums`
are integers and are compared exactly.

Kinks. The bound is first order: it holds while every ReLU input keeps its sign, and a ReLU input
within its own rounding bound of 0 could take the other branch on another machine and move
everything after it by far more. Over the run's six forward passes ResNet-18 and the TD module
feed 13.4M values to ReLUs, 0.36 per unit of |x| near 0; the bound of each, 2·u·(forward +
k·step)·S with S its absolute sum through BatchNorm's 1/σ (median 32, at most 170), is at most
3.1e-8: at that density the expected number within their bound of 0 is 0.04 (2e7 at float32's
u). Measured (tests/fixtures/td_reference_relu_margin.py): the closest to 0 is 1.8e-7, 29
times its bound, so no rounding within the bounds can flip a ReLU in this run, and by induction
over the steps the first-order bound holds throughout. A change of the setup (weights, images,
steps) needs that script rerun.

The setup's learning rate is 1e-4, not the paper's 0.1: on 8 random images a last-bit rounding
difference grows 50-100x per step at 0.01 and above. The fixture's made_by says how far ours and
the reference were apart on the machine that made it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.rounding import EPS64, rounding_bound
from tidal.models import TDPredictor, build_backbone
from tidal.train import TDTask, TrainConfig, train_cycle

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "td_reference.json"
QUANTITIES = ("td_target", "td_logits", "logits", "kl")


def float64_bound(magnitude: float, steps: int, terms: int, stored: float = 0.0) -> float:
    """tests/rounding.py's bound for float64 runs (both ours and the reference's here)."""
    return rounding_bound(magnitude, steps, terms, stored, u=EPS64)


GRID = 2.0 ** -24  # the seeded weights are integers × GRID: exact in float32 and float64


def grid_init(model: nn.Module, gen: torch.Generator) -> None:
    """Every Conv2d and Linear weight and bias, in module order, set to k·2^-24 with k a uniform
    integer in [-K, K], K = ⌊2^24/√fan_in⌋: torch's default initialization's range (±1/√fan_in)
    on a grid. torch's own draw is not the same on every x86 CPU: its uniform_ kernels round
    `from + (to - from)·r` differently (ATen at AVX2 or AVX-512 against the unvectorized
    ATEN_CPU_CAPABILITY=default, which an x86 CPU without AVX2 runs), moving ~half of
    ResNet-18's weights by one float32 step, ~1e-8, far past the float64 tolerances. Integers
    (torch.randint) and their products with a power of two are exact on every CPU."""
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            k = math.floor(2 ** 24 / math.sqrt(layer.weight[0].numel()))
            with torch.no_grad():
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        p.copy_(torch.randint(-k, k + 1, p.shape, generator=gen).to(p.dtype) * GRID)


def seeded_models_and_data(setup: dict[str, Any]) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Our ResNet-18 and TD module (float32) with `grid_init` weights from setup's init seed,
    and the uint8 images and labels from its data seed."""
    backbone = build_backbone("resnet18", setup["image_shape"][0], setup["num_classes"])
    td = TDPredictor(backbone.stage_channels, setup["num_classes"])
    init = torch.Generator().manual_seed(setup["init_seed"])
    for model in (backbone, td):
        grid_init(model, init)
    gen = torch.Generator().manual_seed(setup["data_seed"])
    images = torch.randint(0, 256, (setup["num_samples"], *setup["image_shape"]), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, setup["num_classes"], (setup["num_samples"],), generator=gen)
    return backbone, td, images, labels


def input_checksums(setup: dict[str, Any]) -> dict[str, int]:
    """What defines the seeded weights and inputs, as integers: Σ k over the weights' k·2^-24
    (BatchNorm's 1s count 2^24 each), Σ of the pixels and of the labels. Exact on every CPU, so
    compared exactly: a mismatch means the seeding changed, not the TD code."""
    backbone, td, images, labels = seeded_models_and_data(setup)

    def grid_sum(model: nn.Module) -> int:
        ks = [p.double() / GRID for p in model.parameters()]
        assert all(torch.equal(k, k.round()) for k in ks), "a weight is off the 2^-24 grid"
        return sum(int(k.long().sum()) for k in ks)

    return {"backbone_params": grid_sum(backbone), "td_params": grid_sum(td),
            "images": int(images.long().sum()), "labels": int(labels.sum())}


class RecordingTD(TDTask):
    """The TD task as train_cycle runs it, recording each step's target, module output and loss,
    and `sums`: Σ_j |W_ij·x_j| + |b_i| of the two output layers (the scale of `tolerances`)."""

    def __init__(self, module: nn.Module, weight: float) -> None:
        super().__init__(module, weight)
        self.steps: list[dict[str, Any]] = []
        self.sums: dict[str, float] = {}

    def loss(self, out, idx, logits, y):
        value = super().loss(out, idx, logits, y)
        # After super().loss the recorder holds this step's p̄ for the batch (what the KL used).
        self.steps.append({"indices": idx.tolist(), "td_target": self.recorder.mean[idx].tolist(),
                           "td_logits": out.detach().tolist(), "logits": logits.detach().tolist(),
                           "kl": value.item(), "sums": dict(self.sums)})
        return value


def run_ours(setup: dict[str, Any]) -> list[dict[str, Any]]:
    """Our train_cycle on CPU with setup's hyperparameters; one record per optimizer step."""
    backbone, td, images, labels = seeded_models_and_data(setup)
    # The seeded float32 weights widened exactly to the setup's float64, as the fixture's maker does.
    dtype = getattr(torch, setup["dtype"])
    backbone, td = backbone.to(dtype), td.to(dtype)
    cfg = TrainConfig(epochs=setup["epochs"], batch_size=setup["batch_size"], lr=setup["lr"],
                      momentum=setup["momentum"], weight_decay=setup["weight_decay"],
                      milestones=setup["milestones"], td_weight=setup["td_weight"],
                      crop_pad=setup["crop_pad"], hflip=setup["hflip"])
    task = RecordingTD(td, setup["td_weight"])

    def record_sum(name: str):
        def hook(layer: nn.Linear, args, out) -> None:
            with torch.no_grad():
                task.sums[name] = (args[0].abs() @ layer.weight.abs().T + layer.bias.abs()).max().item()
        return hook

    hooks = [backbone.head.register_forward_hook(record_sum("logits")),
             td.out.register_forward_hook(record_sum("td_logits"))]
    try:
        train_cycle(backbone, task, images, labels, cfg, torch.device("cpu"), seed=setup["train_seed"])
    finally:
        for hook in hooks:
            hook.remove()
    return task.steps


def chain_terms(setup: dict[str, Any]) -> dict[str, int]:
    """The additions on the way to one output (`forward`) and to one parameter's update
    (`step`: its forward, backward and SGD update, and the parameters' storage) that two
    implementations may do in another order, counted from the layers our models run on a batch.

    Every layer is counted as if on the chain (the shortcut and TD branches too, so at least
    the longest chain): a convolution sums C_in·k·k products per output and, backward, C_out·k·k
    per input gradient; BatchNorm's batch statistics sum B·H·W values twice (mean, variance)
    forward and twice backward (Σdy, Σdy·x̂); a linear layer sums its inputs (+ bias) forward and
    its outputs backward. A step adds the largest parameter-gradient sum (B·H·W of the first
    convolution), the losses' sums (softmax and KL over the classes and the batch), SGD's four
    roundings (weight decay, momentum, update) and one storage rounding per parameter tensor."""
    backbone, td, _, _ = seeded_models_and_data(setup)
    batch, classes = setup["batch_size"], setup["num_classes"]
    forward = backward = gradient = 0

    def count(layer: nn.Module, args, out) -> None:
        nonlocal forward, backward, gradient
        if isinstance(layer, nn.Conv2d):
            forward += layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            forward += layer.bias is not None
            backward += layer.out_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            gradient = max(gradient, out.shape[0] * out.shape[2] * out.shape[3])
        elif isinstance(layer, nn.BatchNorm2d):
            forward += 2 * out.shape[0] * out.shape[2] * out.shape[3]
            backward += 2 * out.shape[0] * out.shape[2] * out.shape[3]
        elif isinstance(layer, nn.Linear):
            forward += layer.in_features + (layer.bias is not None)
            backward += layer.out_features
            gradient = max(gradient, out.shape[0])

    layers = [m for m in (*backbone.modules(), *td.modules()) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        _, features = backbone(torch.zeros(batch, *setup["image_shape"]))
        td(features)
    for hook in hooks:
        hook.remove()
    # Global average pooling sums H·W per channel (at most the first stage's, for the TD module).
    forward += max(f.shape[2] * f.shape[3] for f in features)
    losses = 2 * classes + batch + batch * classes + 1  # CE and log_softmax over C, the batch means, KL's B·C
    tensors = sum(1 for _ in backbone.parameters()) + sum(1 for _ in td.parameters())
    return {"forward": forward, "step": forward + backward + gradient + losses + 4 + tensors}


def tolerances(theirs: list[dict[str, Any]], ours: list[dict[str, Any]], setup: dict[str, Any]) -> list[dict[str, float]]:
    """Per step k (k updates before it), how far each quantity may be from the reference's.

    The logits z and the TD module's z̃ end a chain of sums; by tests/rounding.py's bound at
    float64's u = 2^-53 (Higham's bound, relative differences adding along the chain and passed
    on through later steps without growing) the step's own forward adds 2·u·forward·M and each of
    the k updates before it 2·u·step·M (`chain_terms`), where M = max_i Σ_j |W_ij·x_j| + |b_i| of
    the output layer: its terms have both signs (M ≈ 10 against |z| < 1 here), so their absolute
    sum, not |z|, weighs the relative differences the layers before pass on:
        tol_z(k) = 2·u·M_z(k)·(forward + k·step), and alike tol_z̃(k).
    p̄ is the mean over the epochs so far of p = softmax(z); to first order Δp_c = p_c·(Δz_c −
    Σ_j p_j·Δz_j), |Δp_c| ≤ 2·p_c·max|Δz|, so with T(k) = max_{j≤k} tol_z(j), and softmax's and
    the mean's own C + 5 roundings:
        tol_p̄(k) = (2·T(k) + 2·u·(C + 5))·max p̄.
    KL = (1/B)·Σ_n Σ_c p̄_c·r_c, r_c = log p̄_c − log p̃_c, p̃ = softmax(z̃). To first order, per
    sample: through z̃, Σ_c (p̃_c − p̄_c)·Δz̃_c (KL's gradient), at most tol_z̃·Σ_c |p̃_c − p̄_c|;
    through p̄, Σ_c Δp̄_c·(r_c + 1) = Σ_c Δp̄_c·r_c (Σ_c Δp̄_c = 0), at most 2·T(k)·S with
    S = Σ_c p̄_c·|r_c|, and 2·u·(C + 5)·(S + 1) from softmax's own roundings; and the KL's own
    sums (log_softmax's C terms, the batch's B·C terms, four roundings a term), of size
    A = Σ_c p̄_c·(|log p̄_c| + |log p̃_c|):
        tol_KL(k) = max_n [tol_z̃·Σ_c |p̃_c − p̄_c| + 2·T·S + 2·u·(C + 5)·(S + 1)] + 2·u·(B·C + C + 4)·A.
    M comes from our run (`sums`), p̄ and p̃ from the reference's numbers: sizes, not errors.
    First order and smooth: it holds while no ReLU input is within its rounding of 0, which the
    module docstring measures for this setup (the closest is 29 times its bound).
    """
    chain, classes, batch = chain_terms(setup), setup["num_classes"], setup["batch_size"]
    out, worst_z = [], 0.0
    for k, (their, our) in enumerate(zip(theirs, ours, strict=True)):
        tol_z, tol_td = (float64_bound(our["sums"][q], 1, chain["forward"])
                         + float64_bound(our["sums"][q], k, chain["step"]) for q in ("logits", "td_logits"))
        worst_z = max(worst_z, tol_z)
        softmax_own = float64_bound(1.0, 1, classes + 5)  # relative
        p_bar = torch.tensor(their["td_target"], dtype=torch.float64)
        log_p = torch.log_softmax(torch.tensor(their["td_logits"], dtype=torch.float64), dim=1)
        log_bar = torch.log(p_bar.clamp_min(torch.finfo(torch.float64).tiny))
        spread = (p_bar * (log_bar - log_p).abs()).sum(dim=1)  # S per sample
        apart = (log_p.exp() - p_bar).abs().sum(dim=1)  # Σ_c |p̃_c − p̄_c| per sample
        size = (p_bar * (log_bar.abs() + log_p.abs())).sum(dim=1).max().item()
        kl = (tol_td * apart + 2 * worst_z * spread + softmax_own * (spread + 1)).max().item()
        out.append({"logits": tol_z, "td_logits": tol_td, "td_target": (2 * worst_z + softmax_own) * p_bar.max().item(),
                    "kl": kl + float64_bound(size, 1, batch * classes + classes + 4)})
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def ours(reference) -> list[dict[str, Any]]:
    return run_ours(reference["setup"])


def test_seeded_inputs_are_the_fixtures(reference):
    # Integers, the same on every CPU (input_checksums): compared exactly.
    for key, value in input_checksums(reference["setup"]).items():
        assert value == reference["checksums"][key], (
            f"{key}: the seeded weights or inputs are not the ones the fixture was made from "
            f"(torch's random streams or the models' layers changed); remake it with {reference['made_by']['command']}")


def test_same_batches_in_the_same_order(reference, ours):
    assert [s["indices"] for s in ours] == [s["indices"] for s in reference["steps"]]


def differences(theirs: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per step, max |ours − theirs| of each quantity."""
    return [{q: (torch.tensor(mine[q], dtype=torch.float64) - torch.tensor(their[q], dtype=torch.float64))
             .abs().max().item() for q in QUANTITIES} for mine, their in zip(ours, theirs, strict=True)]


@pytest.fixture(scope="module")
def ratios(reference, ours) -> list[dict[str, float]]:
    """Per step and quantity, max |ours − reference| / its tolerance (`pytest -s` prints them)."""
    bounds = tolerances(reference["steps"], ours, reference["setup"])
    found = [{q: d[q] / b[q] for q in QUANTITIES} for d, b in zip(differences(reference["steps"], ours), bounds)]
    print("\nmax |ours - reference| / tolerance, per step:")
    for q in QUANTITIES:
        print(f"  {q:9s}", " ".join(f"{r[q]:.2g}" for r in found), " (tolerances", " ".join(f"{b[q]:.2g}" for b in bounds) + ")")
    return found


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_each_step_matches_the_reference(ratios, quantity):
    for k, step in enumerate(ratios):
        assert step[quantity] <= 1, f"step {k}, {quantity}: differs by {step[quantity]:.3g} × its float64 tolerance"


def test_the_script_that_made_the_fixture_is_in_the_repository(reference):
    """The fixture's made_by names a script of this repository, with the fixture's own setup."""
    import importlib.util

    script = Path(reference["made_by"]["command"].split()[1])
    repo = FIXTURE.parents[2]
    assert not script.is_absolute() and (repo / script).is_file(), reference["made_by"]["command"]
    spec = importlib.util.spec_from_file_location("make_td_reference", repo / script)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert maker.SETUP == reference["setup"]
    assert maker.REFERENCE_COMMIT == reference["made_by"]["reference_commit"]
