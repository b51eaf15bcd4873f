"""A procedural world with exact ground truth, for proving detection and segmentation end to end.

Pretrained weights cannot be downloaded where the pipeline is built and tested, so the pipeline is checked
against scenes it can generate itself: moving circles, squares and triangles whose visible outlines are known to
the pixel. The shipped model (``pipeline/assets/vap-shapes-seg.pt``) is trained on this world by
``python -m pipeline.tools.synth.train`` and scored by ``python -m pipeline.tools.synth.evaluate``.

Only the light modules are imported here; training and evaluation import Ultralytics lazily.
"""

from pipeline.tools.synth.clips import ground_truth_path, load_ground_truth, write_clip
from pipeline.tools.synth.evaluate import AccuracyStats, FrameMatch, is_labelled, is_required, match_frame
from pipeline.tools.synth.world import (
    CLASS_NAMES,
    GroundTruthObject,
    SceneSpec,
    polygon_mask,
    render_frame,
    render_scene,
)

__all__ = [
    "CLASS_NAMES",
    "AccuracyStats",
    "FrameMatch",
    "GroundTruthObject",
    "SceneSpec",
    "ground_truth_path",
    "is_labelled",
    "is_required",
    "load_ground_truth",
    "match_frame",
    "polygon_mask",
    "render_frame",
    "render_scene",
    "write_clip",
]
