"""ResNetBackbone: depths, strides, pretrained loading (file and weights name), freezing, norms."""

from __future__ import annotations

import pytest
import torch
import torchvision.models._api as tv_api
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from retina_sweep.model.backbone import ResNetBackbone, convert_frozen_batchnorm
from retina_sweep.model.norm import FrozenBatchNorm2d  # torchvision's, keeping the input dtype


def _torchvision_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        out.append(x)
    return out


@pytest.mark.parametrize(
    ("depth", "channels"),
    [(10, [64, 128, 256, 512]), (18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])],
)
def test_channels_strides_and_shapes(depth, channels):
    bb = ResNetBackbone(depth=depth)
    assert bb.out_channels == {f"C{lv}": c for lv, c in zip(range(2, 6), channels, strict=True)}
    assert bb.strides == {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 96))
    for lv, c in zip(range(2, 6), channels, strict=True):
        assert feats[f"C{lv}"].shape == (1, c, 64 // 2**lv, 96 // 2**lv)


def test_depth_10_is_one_basic_block_per_stage():
    bb = ResNetBackbone(depth=10)
    assert [len(getattr(bb, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert isinstance(bb.layer1[0], BasicBlock)
    reference = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d).state_dict()
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in bb.state_dict().items()} == expected


def _saved_resnet18(tmp_path, wrap=None, prefix=""):
    torch.manual_seed(0)
    net = resnet18(norm_layer=nn.BatchNorm2d).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that loading them is checked too
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    state = {prefix + k: v for k, v in net.state_dict().items()}  # includes fc.* keys
    path = tmp_path / "resnet18.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    return net, path


@pytest.mark.parametrize(("wrap", "prefix"), [(None, ""), ("model", ""), ("state_dict", "module.")])
def test_checkpoint_round_trip(tmp_path, wrap, prefix):
    net, path = _saved_resnet18(tmp_path, wrap, prefix)
    bb = ResNetBackbone(depth=18, pretrained=str(path), norm="frozen_bn").eval()
    torch.testing.assert_close(bb.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    torch.testing.assert_close(bb.bn1.running_var, net.bn1.running_var)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = bb(x)
        ref = _torchvision_features(net, x)
    for lv, r in zip(range(2, 6), ref, strict=True):
        torch.testing.assert_close(ours[f"C{lv}"], r)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        ResNetBackbone(depth=18, pretrained=path)


def test_missing_keys_are_reported(tmp_path):
    state = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"miss \d+ backbone keys.*layer4\.0\.conv1\.weight"):
        ResNetBackbone(depth=18, pretrained=path)


def test_unexpected_keys_are_an_error(tmp_path):
    state = dict(resnet18().state_dict())
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"1 keys that the backbone .* does not have: extra"):
        ResNetBackbone(depth=18, pretrained=path)


def test_checkpoint_of_another_depth_is_refused(tmp_path):
    # ResNet-18's keys are a subset of ResNet-34's with the same shapes: loading what fits used
    # to give a depth-18 network with a warning, not the depth that was asked for.
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    with pytest.raises(RuntimeError, match=r"depth=18.*layer1\.2\.conv1\.weight"):
        ResNetBackbone(depth=18, pretrained=path)


def test_batchnorm_weights_refused_by_a_groupnorm_backbone(tmp_path):
    # GN has a weight and a bias where BN has them: only the BN statistics tell them apart.
    _, path = _saved_resnet18(tmp_path)
    with pytest.raises(RuntimeError, match=r"norm='gn'.*bn1\.running_mean"):
        ResNetBackbone(depth=18, pretrained=path, norm="gn")


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_imagenet_layout_loads_into_every_batchnorm(tmp_path, norm):
    # torchvision's ImageNet files: BN statistics but no num_batches_tracked (saved before it
    # existed), plus fc.*: both are fine, whichever batch norm the backbone has.
    net, _ = _saved_resnet18(tmp_path)
    state = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "imagenet_layout.pth"
    torch.save(state, path)
    bb = ResNetBackbone(depth=18, pretrained=path, norm=norm, freeze_at=2).eval()
    torch.testing.assert_close(bb.layer1[0].bn2.running_var, net.layer1[0].bn2.running_var)
    torch.testing.assert_close(bb.layer4[1].bn2.running_mean, net.layer4[1].bn2.running_mean)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)["C5"], _torchvision_features(net, x)[-1])


def test_torchvision_resnet50_state_dict_is_the_paper_backbone(tmp_path):
    # The paper's backbone: torchvision's ResNet-50 names (what IMAGENET1K_V1 holds) load with
    # nothing missing or left over into depth 50, frozen BN, stem + res2 frozen, and give
    # torchvision's features in eval mode.
    torch.manual_seed(0)
    net = resnet50().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    bb = ResNetBackbone(depth=50, pretrained=path, freeze_at=2, norm="frozen_bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert not any(p.requires_grad for p in (*bb.conv1.parameters(), *bb.layer1.parameters()))
    assert all(p.requires_grad for p in bb.layer2.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = bb.train()(x)  # frozen BN: train mode changes nothing
        ref = _torchvision_features(net, x)
    for lv, r in zip(range(2, 6), ref, strict=True):
        # frozen BN folds its statistics into a scale and a shift: float32 rounding, 50 layers
        torch.testing.assert_close(ours[f"C{lv}"], r, rtol=1e-4, atol=1e-4)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"cannot read pretrained checkpoint .*truncated\.pth"):
        ResNetBackbone(depth=18, pretrained=path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="state dict"):
        ResNetBackbone(depth=18, pretrained=path)


def test_torchvision_weights_name(monkeypatch):
    # No download here: intercept torchvision's URL loader, check the URL it resolved and that
    # what it returns is what the backbone loads.
    torch.manual_seed(1)
    source = resnet18()
    urls = []

    def fake_load(url, *args, **kwargs):
        urls.append(url)
        return source.state_dict()

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_load)
    bb = ResNetBackbone(depth=18, pretrained="IMAGENET1K_V1")
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    torch.testing.assert_close(bb.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    bb = ResNetBackbone(depth=18, pretrained="ResNet18_Weights.IMAGENET1K_V1")
    assert len(urls) == 2


def test_weights_download_failure_says_what_to_do(monkeypatch):
    # A GPU node without internet: urllib's error alone names neither the file nor a way out.
    import urllib.error

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"resnet18-f37072fd\.pth.*without internet.*path"):
        ResNetBackbone(depth=18, pretrained="IMAGENET1K_V1")


def test_bad_weights_names():
    with pytest.raises(ValueError, match="depth 10"):
        ResNetBackbone(depth=10, pretrained="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="NOT_A_WEIGHT"):
        ResNetBackbone(depth=18, pretrained="NOT_A_WEIGHT")


def _trainable(module: nn.Module) -> bool:
    return all(p.requires_grad for p in module.parameters())


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    bb = ResNetBackbone(depth=10, freeze_at=freeze_at, norm="bn")
    stages = [bb.conv1, bb.layer1, bb.layer2, bb.layer3, bb.layer4]
    for i, stage in enumerate(stages):
        assert (_frozen if i < freeze_at else _trainable)(stage), (freeze_at, i)
    # Frozen stages' batch norms are frozen too (no running-statistics updates).
    assert isinstance(bb.bn1, FrozenBatchNorm2d if freeze_at >= 1 else nn.BatchNorm2d)
    if freeze_at >= 2:
        assert isinstance(bb.layer1[0].bn1, FrozenBatchNorm2d)
    if freeze_at < 5:
        assert isinstance(bb.layer4[0].bn1, nn.BatchNorm2d)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    bb.train()(torch.randn(2, 3, 64, 64))
    after = bb.state_dict()
    for key in before:
        if key.startswith(("bn1.", "layer1.")) and freeze_at >= 2:
            torch.testing.assert_close(after[key], before[key])
    if freeze_at < 5:
        assert not torch.equal(
            after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"]
        )


def test_freeze_at_two_with_frozen_bn_and_gradients():
    bb = ResNetBackbone(depth=10, freeze_at=2)
    bb(torch.randn(1, 3, 64, 64))["C5"].sum().backward()
    assert bb.conv1.weight.grad is None and bb.layer1[0].conv1.weight.grad is None
    assert bb.layer2[0].conv1.weight.grad is not None


def test_norm_options():
    frozen = ResNetBackbone(depth=10, norm="frozen_bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) > 0
    gn = ResNetBackbone(depth=10, norm="gn")
    groups = [m.num_groups for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and set(groups) == {32}
    bn = ResNetBackbone(depth=10, norm="bn")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) > 0


def test_convert_frozen_batchnorm_keeps_eval_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net.train()(torch.randn(4, 3, 8, 8))  # moves the running statistics off their init
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    converted = convert_frozen_batchnorm(net)
    assert isinstance(converted[1], FrozenBatchNorm2d)
    torch.testing.assert_close(converted(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"depth": 152}, "depth"), ({"freeze_at": 6}, "freeze_at"), ({"norm": "syncbn"}, "norm")],
)
def test_rejects_bad_arguments(kwargs, name):
    args = {"depth": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ResNetBackbone(**args)
