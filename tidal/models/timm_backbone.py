"""Any timm architecture behind the backbone contract: forward(x) -> (logits, [stage features]).

The timm network is built without its classifier (`num_classes=0`); our own `head` classifies
the pool's classes. The stage maps come from timm's `forward_intermediates` at its
`feature_info` stages, and the pooled pre-logits vector is appended as a last, 1×1 "stage", so
`backbones.penultimate(features)` is exactly timm's pre-logits (the head's input).
"""
from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from tidal.workspace import atomic_write_bytes


def pretrained_config(arch: str) -> dict:
    """mean, std and input_size of the architecture's default pretrained tag (no model is built,
    nothing is downloaded)."""
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture '{arch}'")
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as error:  # a known architecture with an unknown tag ("resnet10t.bogus")
        raise ValueError(f"timm architecture '{arch}': {error}") from None
    if cfg is None:  # an architecture without any pretrained tag: timm's own defaults
        cfg = timm.models.PretrainedCfg()
    return {"mean": tuple(float(v) for v in cfg.mean), "std": tuple(float(v) for v in cfg.std),
            "input_size": tuple(int(v) for v in cfg.input_size)}


class WeightsError(ValueError):
    """Pretrained weights that cannot be had or do not fit the backbone: an input error, whose
    message says which file or which keys (tidal's CLI prints it as one line, exit code 2)."""


# The `backbone_weights` value for timm's own pretrained weights of the architecture.
HUB_WEIGHTS = "timm"


def hub_weights(arch: str, directory: Path) -> Path:
    """timm's own pretrained weights for `arch` (its default tag), as a state_dict file in
    `directory`: timm fetches them through the Hugging Face hub and its cache (`HF_HOME`), which
    needs the network the first time; the file written here is read from then on, offline."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):  # timm would start from random weights
        raise WeightsError(f"timm has no pretrained weights for {arch}: choose a backbone that has them "
                         f"(timm.list_pretrained()) or give a weights file, --set backbone_weights=PATH")
    tag = cfg.tag or "default"
    out = Path(directory) / f"{arch}.{tag}-timm.pth"
    if out.is_file():
        return out
    try:
        model = timm.create_model(arch, pretrained=True)
    except Exception as error:  # no network, no such file on the hub, a proxy's refusal: all one case here
        raise WeightsError(f"timm could not load the pretrained weights of {arch} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}). timm downloads them once "
                         f"into its Hugging Face cache; without network, give a weights file instead: "
                         f"--set backbone_weights=PATH") from None
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(out, buffer.getvalue())
    return out


class TimmBackbone(nn.Module):
    """A timm network (`self.net`, classifier removed) with our head for `num_classes`.

    Inputs arrive as (x01 - 0.5) / 0.5 (`tidal.train.normalize`, for every backbone); they are
    re-normalized to the architecture's pretrained mean/std, so ImageNet weights see the
    statistics they were trained on. A 1-channel input is repeated to the 3 channels the
    pretrained stem expects.
    """

    def __init__(self, arch: str, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        cfg = pretrained_config(arch)
        model_channels = cfg["input_size"][0]
        if in_channels not in (1, model_channels):
            raise ValueError(f"timm backbone '{arch}' takes {model_channels}-channel (or 1-channel) "
                             f"images, not {in_channels}")
        self.arch = arch
        self.in_channels = in_channels
        self.repeat_channels = model_channels if in_channels == 1 and model_channels != 1 else 1
        self.net = timm.create_model(arch, pretrained=False, num_classes=0)
        # Indices into feature_info: forward_intermediates returns exactly these stages (timm 1.0).
        self.stage_indices = list(range(len(self.net.feature_info)))
        # The pre-logits width: num_features for most nets, but nets with a conv head after the
        # pooling (MobileNetV3: 576 -> 1024) report it as head_hidden_size.
        pre_logits = getattr(self.net, "head_hidden_size", None) or self.net.num_features
        self.stage_channels = [int(info["num_chs"]) for info in self.net.feature_info] + [int(pre_logits)]

        # x_model = (x01 - mean) / std with x01 = 0.5 * x + 0.5, i.e. x * scale + shift.
        mean = torch.tensor(cfg["mean"], dtype=torch.float32).expand(model_channels)
        std = torch.tensor(cfg["std"], dtype=torch.float32).expand(model_channels)
        scale, shift = 0.5 / std, (0.5 - mean) / std
        # Skipped when it is the identity (mean = std = 0.5, e.g. tf_efficientnet_lite0): `x*1+0`
        # would turn -0.0 into +0.0, skipping keeps the input bit for bit.
        self.renormalize = not (bool((scale == 1).all()) and bool((shift == 0).all()))
        self.register_buffer("input_scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, -1, 1, 1), persistent=False)

        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(int(pre_logits), num_classes)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """The trainer's (x01 - 0.5) / 0.5 as the timm network expects it."""
        if self.repeat_channels > 1:
            x = x.repeat(1, self.repeat_channels, 1, 1)
        if self.renormalize:
            x = x * self.input_scale + self.input_shift
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # stop_early=False: the whole trunk runs, so `final` is forward_features(x) (head conv incl.).
        final, stages = self.net.forward_intermediates(self.model_input(x), indices=self.stage_indices,
                                                       stop_early=False, intermediates_only=False)
        pre_logits = self.net.forward_head(final, pre_logits=True)
        features = list(stages) + [pre_logits.reshape(pre_logits.shape[0], -1, 1, 1)]
        logits = self.head(self.dropout(pre_logits.flatten(1)))
        return logits, features


@functools.lru_cache(maxsize=16)
def stage_channels(arch: str) -> tuple[int, ...]:
    """TimmBackbone(arch, ...).stage_channels, built once per process (a frozen backbone's head
    needs only the widths, every step). Built on a forked random stream: the network's random
    init must not move the caller's seeded stream, or a head's init would depend on whether this
    process had asked before."""
    with torch.random.fork_rng(devices=[]):
        return tuple(TimmBackbone(arch, 3, 1).stage_channels)


def _classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    names = net.pretrained_cfg.get("classifier") or ()
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def _listing(keys: list[str], shapes: Mapping[str, tuple], limit: int = 3) -> str:
    shown = ", ".join(f"{key} {list(shapes[key])}" for key in keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_weights(backbone: TimmBackbone, path: str | Path) -> None:
    """Load a full timm model's state_dict (its classifier dropped: our head classifies the pool's
    classes) into `backbone.net`, refusing any missing key, unexpected key or shape mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not usable
        raise WeightsError(f"{path} is not a torch weights file (torch.load failed: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path} does not hold a state_dict (a dict of name -> tensor), "
                         f"but a {type(state).__name__}")
    prefixes = _classifier_prefixes(backbone.net)
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = backbone.net.state_dict()
    given = {k: tuple(v.shape) for k, v in state.items()}
    wanted = {k: tuple(v.shape) for k, v in expected.items()}

    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{path}: {len(missing)} key(s) of {backbone.arch} missing: {_listing(missing, wanted)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise WeightsError(f"{path}: {len(unexpected)} unexpected key(s) for {backbone.arch}: "
                         f"{_listing(unexpected, given)}")
    wrong = [k for k in expected if given[k] != wanted[k]]
    if wrong:
        shown = ", ".join(f"{k} {list(given[k])} (expected {list(wanted[k])})" for k in wrong[:3])
        more = f", … ({len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise WeightsError(f"{path}: {len(wrong)} tensor(s) of the wrong shape for {backbone.arch}: {shown}{more}")
    backbone.net.load_state_dict(state, strict=True)
