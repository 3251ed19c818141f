"""ResNet backbone (torchvision's ResNet) returning the C2..C5 feature maps.

Depth 10 (BasicBlock, one block per stage) is a CPU proxy; 18, 34, 50 and 101 are the
standard torchvision networks. Pretrained weights come from a local file or a torchvision
weights name. As in Detectron, the first stages can be frozen (``freeze_at``) and the batch
norms replaced by frozen affine layers (``norm="frozen_bn"``), since 2 images per GPU are too
few for batch statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import get_weight
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .norm import FrozenBatchNorm2d, GroupNorm32

__all__ = ["ResNetBackbone", "NORMS", "DEPTHS", "convert_frozen_batchnorm"]

# depth -> (block, blocks per stage); 10 is not a torchvision network (no pretrained weights).
DEPTHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}
NORMS = ("frozen_bn", "bn", "gn")
# Stages in forward order; freeze_at=k freezes the first k of them (1 = stem, 2 = stem + res2).
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        # 32 groups as in "Group Normalization" (Wu & He); fewer if the layer is narrower.
        # Float32 under autocast (model/norm.py); exactly nn.GroupNorm outside it.
        return lambda channels: GroupNorm32(min(32, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a `FrozenBatchNorm2d` with its current
    affine parameters and running statistics (detectron2's ``convert_frozen_batchnorm``).

    Returns the converted module (``module`` itself is modified in place unless it is a batch
    norm).
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.running_mean is not None:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _looks_like_path(pretrained: str) -> bool:
    return (
        os.sep in pretrained
        or "/" in pretrained
        or pretrained.endswith((".pt", ".pth", ".pkl", ".ckpt", ".bin"))
        or os.path.exists(pretrained)
    )


def _checkpoint_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a zip or pickle error that does not name the file
        raise ValueError(
            f"cannot read pretrained checkpoint {path} as a torch state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"pretrained checkpoint {path} must hold a state dict (or a dict with a 'model' or "
            "'state_dict' key holding one)"
        )
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _torchvision_state_dict(depth: int, name: str) -> dict[str, Tensor]:
    if depth == 10:
        raise ValueError(
            f"pretrained={name!r}: depth 10 has no torchvision weights; use depth in "
            "18, 34, 50, 101 or a local checkpoint file"
        )
    enum_name = name if "." in name else f"ResNet{depth}_Weights.{name}"
    try:
        weights = get_weight(enum_name)
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"pretrained={name!r} is neither an existing file nor a torchvision weights name of "
            f"ResNet{depth}_Weights (e.g. 'IMAGENET1K_V1')"
        ) from err
    try:
        return weights.get_state_dict(progress=False)
    except OSError as err:  # urllib's URLError, a refused connection, a full disk
        file_name = weights.url.rsplit("/", 1)[-1]
        raise RuntimeError(
            f"pretrained={name!r}: cannot fetch {weights.url} into torch's cache "
            f"({torch.hub.get_dir()}/checkpoints): {err}. On a machine without internet, copy "
            f"{file_name} there from one that has it, or set model.backbone.pretrained to the "
            "path of the file"
        ) from err


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier, returning ``{"C2": ..., "C5": ...}``.

    ``C_l`` has stride ``2**l``: for an input (N, 3, H, W), C2 is (N, c2, H/4, W/4) ... C5 is
    (N, c5, H/32, W/32), with ``out_channels`` (64, 128, 256, 512) for depths 10-34 and
    (256, 512, 1024, 2048) for 50 and 101.

    Args:
        depth: 10, 18, 34, 50 or 101.
        pretrained: ``None``; a local file holding a state dict of a torchvision ResNet (or a
            dict with a ``"model"`` / ``"state_dict"`` key holding one; ``fc.*`` keys are
            dropped); or a torchvision weights name such as ``"IMAGENET1K_V1"`` (or
            ``"ResNet50_Weights.IMAGENET1K_V1"``), downloaded by torchvision.
        freeze_at: number of leading stages whose parameters are frozen: 0 none, 1 the stem
            (conv1 + its norm), 2 the stem and res2 (``layer1``, Detectron's default), ... 5 all.
            With ``norm="bn"`` the batch norms of frozen stages become `FrozenBatchNorm2d`.
        norm: ``"frozen_bn"`` (fixed affine, the paper's choice), ``"bn"`` or ``"gn"``.
    """

    def __init__(
        self,
        *,
        depth: int,
        pretrained: str | os.PathLike | None = None,
        freeze_at: int = 0,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        if not (isinstance(freeze_at, int) and 0 <= freeze_at <= len(_STAGES)):
            raise ValueError(
                f"freeze_at must be an integer in 0..{len(_STAGES)}, got {freeze_at!r}"
            )
        block, layers = DEPTHS[depth]
        net = ResNet(block, layers, norm_layer=_norm_layer(norm))
        self.depth = depth
        self.norm = norm
        self.freeze_at = freeze_at
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4
        expansion = block.expansion
        self.out_channels: dict[str, int] = {
            f"C{level}": 64 * 2 ** (level - 2) * expansion for level in range(2, 6)
        }
        self.strides: dict[str, int] = {f"C{level}": 2**level for level in range(2, 6)}
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        for stage in _STAGES[:freeze_at]:
            for attr in ("conv1", "bn1") if stage == "stem" else (stage,):
                module = getattr(self, attr)
                if self.norm == "bn":
                    # A frozen stage must not update its running statistics either.
                    module = convert_frozen_batchnorm(module)
                    setattr(self, attr, module)
                for p in module.parameters():
                    p.requires_grad_(False)

    def load_pretrained(self, pretrained: str | os.PathLike) -> None:
        """Load ImageNet weights from a file or a torchvision weights name (see the class).

        Raises:
            FileNotFoundError: a path that does not exist (the message names it).
            ValueError: an unknown weights name, depth 10 with a weights name, a file that torch
                cannot read or that does not hold a state dict (the message names it).
            RuntimeError: a torchvision weights download that failed (the message says how to
                do without it); parameters of the backbone missing from the weights, or keys in
                the weights that the backbone does not have (another depth, or batch-norm
                weights for ``norm="gn"``; the message lists them); shape mismatches. Only the
                classifier (``fc.*``) and a frozen batch norm's ``num_batches_tracked`` are
                dropped.
        """
        source = os.fspath(pretrained)
        if _looks_like_path(source):
            state = _checkpoint_state_dict(Path(source))
        else:
            state = _torchvision_state_dict(self.depth, source)
        # The classifier is not part of the backbone.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise RuntimeError(f"cannot load pretrained weights {source}: {err}") from err
        if result.missing_keys:
            shown = ", ".join(result.missing_keys[:10])
            raise RuntimeError(
                f"pretrained weights {source} miss {len(result.missing_keys)} backbone keys "
                f"(depth={self.depth}, norm={self.norm!r}): {shown}"
                + (" ..." if len(result.missing_keys) > 10 else "")
            )
        if result.unexpected_keys:
            # Weights the backbone has no place for mean that the checkpoint is another network:
            # a deeper ResNet (its extra blocks would be dropped silently) or batch-norm weights
            # and statistics for a GroupNorm backbone. Loading what fits would train something
            # else than what was asked for.
            shown = ", ".join(result.unexpected_keys[:10])
            raise RuntimeError(
                f"pretrained weights {source} hold {len(result.unexpected_keys)} keys that the "
                f"backbone (depth={self.depth}, norm={self.norm!r}) does not have: {shown}"
                + (" ..." if len(result.unexpected_keys) > 10 else "")
                + "; is the checkpoint of another depth or norm?"
            )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) -> {"C2": (N, c2, H/4, W/4), ..., "C5": (N, c5, H/32, W/32)}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"C2": c2, "C3": c3, "C4": c4, "C5": c5}
