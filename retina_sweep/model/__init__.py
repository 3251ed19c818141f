"""RetinaNet model: backbone, FPN, anchors, matcher, box coder, head and the detector."""

from .anchors import AnchorGenerator, paper_anchor_sizes
from .backbone import ResNetBackbone
from .box_coder import BoxCoder
from .detector import RetinaNet, build_anchor_generator, build_retinanet
from .fpn import RetinaFPN
from .head import RetinaHead
from .matcher import Matcher, anchor_state, box_ioa

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "Matcher",
    "ResNetBackbone",
    "RetinaFPN",
    "RetinaHead",
    "RetinaNet",
    "anchor_state",
    "box_ioa",
    "build_anchor_generator",
    "build_retinanet",
    "paper_anchor_sizes",
]
