"""TimmBackbone: the backbone contract on timm nets, the input re-normalization, weight loading
(and its refusals), and the EfficientNet-Lite0 conversion. CPU only, nothing downloaded."""
from __future__ import annotations

import pytest
import timm
import torch

from tidal.models.backbones import penultimate
from tidal.models.convert_lite0 import convert_lite0, lite0_by_position, package_weights_path
from tidal.models.td_module import TDPredictor
from tidal.models.timm_backbone import TimmBackbone, load_backbone_weights, pretrained_config

LITE0 = "tf_efficientnet_lite0"


def _input(channels: int = 3, seed: int = 0) -> torch.Tensor:
    x01 = torch.rand(2, channels, 64, 64, generator=torch.Generator().manual_seed(seed))
    return (x01 - 0.5) / 0.5  # as tidal.train.normalize hands it over


@pytest.mark.parametrize("arch, stages", [
    (LITE0, [16, 24, 40, 112, 320, 1280]),
    ("resnet10t", [64, 64, 128, 256, 512, 512]),
    ("mobilenetv3_small_050", [16, 8, 16, 24, 288, 1024]),  # pre-logits wider than num_features
])
def test_stages_logits_and_penultimate(arch, stages):
    torch.manual_seed(0)
    model = TimmBackbone(arch, in_channels=3, num_classes=7).eval()
    x = _input()
    with torch.no_grad():
        logits, features = model(x)
        net_x = model.model_input(x)
        reference = model.net.forward_head(model.net.forward_features(net_x), pre_logits=True)
    assert logits.shape == (2, 7)
    assert model.stage_channels == stages
    assert [f.shape[1] for f in features] == stages
    assert features[-1].shape[2:] == (1, 1)
    assert [f.shape[-1] for f in features[:-1]] == [32, 16, 8, 4, 2]  # reductions 2 … 32
    assert torch.equal(penultimate(features), reference)
    assert torch.equal(logits, model.head(reference))
    assert TDPredictor(model.stage_channels, 7)(features).shape == (2, 7)


def test_renormalization_to_the_pretrained_statistics():
    x = _input()
    x01 = x * 0.5 + 0.5
    lite0 = TimmBackbone(LITE0, in_channels=3, num_classes=3)
    # mean = std = 0.5: the affine is the identity, skipped, the input passes bit for bit ...
    assert pretrained_config(LITE0) == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 224, 224)}
    assert not lite0.renormalize
    assert torch.equal(lite0.input_scale, torch.ones(1, 3, 1, 1))
    assert torch.equal(lite0.input_shift, torch.zeros(1, 3, 1, 1))
    assert lite0.model_input(x) is x
    # ... and applying it anyway would give the same values
    assert torch.equal(x * lite0.input_scale + lite0.input_shift, x)
    # ImageNet statistics (resnet10t): (x01 - mean) / std
    resnet = TimmBackbone("resnet10t", in_channels=3, num_classes=3)
    assert resnet.renormalize
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(resnet.model_input(x), (x01 - mean) / std)
    # not saved: the state_dict is the timm net and our head only
    assert not [k for k in resnet.state_dict() if not k.startswith(("net.", "head."))]


def test_grayscale_input_is_repeated_to_three_channels():
    torch.manual_seed(0)
    gray = TimmBackbone(LITE0, in_channels=1, num_classes=4).eval()
    color = TimmBackbone(LITE0, in_channels=3, num_classes=4).eval()
    color.load_state_dict(gray.state_dict())
    x = _input(channels=1)
    with torch.no_grad():
        logits, features = gray(x)
        expected, _ = color(x.repeat(1, 3, 1, 1))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert torch.equal(logits, expected)
    with pytest.raises(ValueError, match="4"):
        TimmBackbone(LITE0, in_channels=4, num_classes=4)
    with pytest.raises(ValueError, match="no_such_net"):
        TimmBackbone("no_such_net", in_channels=3, num_classes=4)


def test_dropout_before_the_head():
    assert isinstance(TimmBackbone("resnet10t", 3, 2).dropout, torch.nn.Identity)
    model = TimmBackbone("resnet10t", 3, 2, dropout=0.3)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.3


@pytest.fixture
def saved(tmp_path):
    """A freshly seeded full timm model (10-class classifier) and its saved state_dict."""
    torch.manual_seed(1)
    source = timm.create_model(LITE0, pretrained=False, num_classes=10).eval()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    return source, path


def test_saved_weights_load_back_exactly(saved):
    source, path = saved
    torch.manual_seed(2)  # a different initialization, so loading has to change every tensor
    model = TimmBackbone(LITE0, in_channels=3, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    load_backbone_weights(model, path)
    src = source.state_dict()
    loaded = model.net.state_dict()
    assert set(loaded) == {k for k in src if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], src[k]) for k in loaded)
    assert any(not torch.equal(before[k], loaded[k]) for k in loaded)
    model.head.load_state_dict(source.classifier.state_dict())
    x = _input()
    with torch.no_grad():
        logits, features = model(x)
        assert torch.equal(penultimate(features), source.forward_head(source.forward_features(x), pre_logits=True))
        assert torch.equal(logits, source(x))


def _refusal(model: TimmBackbone, path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        load_backbone_weights(model, path)
    assert str(path) in str(info.value)


def test_refuses_a_file_that_is_not_torch(tmp_path):
    model = TimmBackbone(LITE0, 3, 10)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a torch file")
    _refusal(model, junk, "not a torch weights file")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    _refusal(model, tmp_path / "list.pth", "does not hold a state_dict")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(model, tmp_path / "absent.pth")


def test_refuses_wrong_shape_missing_and_unexpected_keys(saved, tmp_path):
    source, _ = saved
    model = TimmBackbone(LITE0, 3, 10)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    state = source.state_dict()

    shapes = dict(state, **{"blocks.2.0.conv_pw.weight": torch.zeros(3, 3, 1, 1)})
    torch.save(shapes, tmp_path / "shape.pth")
    _refusal(model, tmp_path / "shape.pth",
             r"1 tensor\(s\) of the wrong shape.*blocks\.2\.0\.conv_pw\.weight \[3, 3, 1, 1\]")

    missing = {k: v for k, v in state.items() if k != "blocks.3.1.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    width = state["blocks.3.1.bn2.running_var"].shape[0]
    _refusal(model, tmp_path / "missing.pth", rf"1 key\(s\) .*missing: blocks\.3\.1\.bn2\.running_var \[{width}\]")

    extra = dict(state, **{"extra.weight": torch.zeros(5), "extra.bias": torch.zeros(5)})
    torch.save(extra, tmp_path / "extra.pth")
    _refusal(model, tmp_path / "extra.pth", r"2 unexpected key\(s\).*extra\.weight \[5\]")

    # a refused file changes nothing
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_conversion_of_the_imagenet_lite0_weights(tmp_path):
    package = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    by_position = lite0_by_position()
    path = convert_lite0(tmp_path / "sub" / "lite0.pth")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert len(saved) == len(package) == 296
    assert list(saved)[-2:] == ["classifier.weight", "classifier.bias"]
    assert saved["classifier.weight"].shape == (1000, 1280)
    assert all(torch.equal(a, b) for a, b in zip(saved.values(), package.values()))
    assert not list(path.parent.glob(".*tmp"))  # the temporary file was renamed away

    # the ImageNet model from the file gives the by-position model's logits, finite
    from_file = timm.create_model(LITE0, pretrained=False)
    from_file.load_state_dict(saved, strict=True)
    from_file.eval()
    x = _input(seed=3)
    with torch.no_grad():
        logits = from_file(x)
        assert torch.equal(logits, by_position(x))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not a constant, untrained head

    # the backbone takes the file, the classifier dropped, and gives the same pre-logits
    backbone = TimmBackbone(LITE0, in_channels=3, num_classes=5).eval()
    load_backbone_weights(backbone, path)
    with torch.no_grad():
        _, features = backbone(x)
        expected = from_file.forward_head(from_file.forward_features(x), pre_logits=True)
        assert torch.equal(penultimate(features), expected)
