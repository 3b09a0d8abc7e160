"""Box and target geometry for CenterNet-style detection: pure tensor functions.

A low module (it imports only torch) so that both the detection losses (:mod:`distill.losses`) and
the detection task (:mod:`distill.tasks.detection`, which re-exports these names) can use it.

Conventions: boxes are ``(x1, y1, x2, y2)`` in input pixels (pixel ``j`` covers ``[j, j + 1)``);
a batch's boxes are ``[B, M, 4]``, padded to the ``M`` objects of the fullest image, with
``labels`` ``[B, M]`` and ``mask`` ``[B, M]`` (which rows are real objects). An output map at
``stride`` ``s`` has a cell per ``s × s`` input pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

STRIDE = 4  # the output stride of the toolkit's CenterNet detectors (distill.models.detection)


def unpack_targets(target: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [B, M, 4] float, labels [B, M] int64, mask [B, M] bool)`` from a batch's target dict."""
    if not isinstance(target, dict) or not {"boxes", "labels", "mask"} <= set(target):
        raise ValueError(
            "detection targets must be a dict with 'boxes' [B, M, 4], 'labels' [B, M] and 'mask' [B, M] "
            f"(as DetectionLoader yields), got {type(target).__name__}"
        )
    boxes, labels, mask = target["boxes"], target["labels"], target["mask"]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2] or mask.shape != labels.shape:
        raise ValueError(
            f"detection targets: boxes {tuple(boxes.shape)}, labels {tuple(labels.shape)}, mask "
            f"{tuple(mask.shape)}; expected [B, M, 4], [B, M], [B, M]"
        )
    return boxes.float(), labels.long(), mask.bool()


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.7) -> torch.Tensor:
    """The largest corner displacement ``r`` that keeps IoU >= ``min_overlap`` with a ``height × width``
    box, whichever way the displaced box moves (CornerNet's rule, Law & Deng 2018, used for centres
    by CenterNet with ``min_overlap`` 0.7).

    Three cases, each a quadratic in ``r`` solved exactly (the smallest root): both corners moved
    the same way by ``r`` (a shifted box), both moved inwards (a box ``2r`` smaller) and both moved
    outwards (a box ``2r`` larger). Returns the minimum, in the units of ``height``/``width``.
    (CenterNet's released code, inherited from an early CornerNet version, divides the roots
    differently and gets larger radii; see ``min_radius`` in :func:`encode_targets`.)
    """
    t = float(min_overlap)
    if not 0 < t < 1:
        raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
    h, w = height.float(), width.float()
    s, p = h + w, h * w
    # shifted: (h - r)(w - r) / (2hw - (h - r)(w - r)) >= t  <=>  r^2 - s r + p (1 - t)/(1 + t) >= 0
    r1 = (s - torch.sqrt((s * s - 4 * p * (1 - t) / (1 + t)).clamp_min(0))) / 2
    # shrunk: (h - 2r)(w - 2r) / hw >= t  <=>  4 r^2 - 2 s r + (1 - t) p >= 0
    r2 = (2 * s - torch.sqrt((4 * s * s - 16 * (1 - t) * p).clamp_min(0))) / 8
    # grown: hw / ((h + 2r)(w + 2r)) >= t  <=>  4 t r^2 + 2 t s r - (1 - t) p <= 0
    r3 = (-2 * t * s + torch.sqrt((4 * t * t * s * s + 16 * t * (1 - t) * p).clamp_min(0))) / (8 * t)
    return torch.minimum(torch.minimum(r1, r2), r3).clamp_min(0)


def encode_targets(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    num_classes: int,
    out_size: tuple[int, int],
    stride: int = STRIDE,
    min_overlap: float = 0.7,
    min_radius: int = 1,
) -> dict[str, torch.Tensor]:
    """CenterNet targets for boxes in input pixels.

    Each object's centre ``c = ((x1 + x2) / 2, (y1 + y2) / 2) / stride`` falls in cell
    ``p = floor(c)``. Returns, for ``[B, M]`` objects and an ``out_size = (H, W)`` output map:

    - ``heatmap`` ``[B, K, H, W]``: per class, the maximum over its objects of
      ``exp(-((x - px)^2 + (y - py)^2) / (2 sigma^2))`` within ``|x - px|, |y - py| <= r``, with
      ``r = max(floor(gaussian_radius(h, w, min_overlap)), min_radius)`` for the box in output cells
      and ``sigma = (2r + 1) / 6``; exactly 1 at each centre cell. The exact radius is 0 for boxes
      under about 5 cells at ``min_overlap`` 0.7, which makes every neighbour of a centre a full
      negative; a floor of 1 keeps a small bump (CenterPoint, Yin, Zhou & Krähenbühl 2021, floors
      it at 2);
    - ``size`` ``[B, M, 2]``: ``(w, h) / stride``; ``offset`` ``[B, M, 2]``: ``c - p``;
    - ``cell`` ``[B, M, 2]`` int64 ``(py, px)``; ``mask`` ``[B, M]``: real objects whose centre is
      on the map.
    """
    height, width = out_size
    boxes = boxes.float()
    b, m = labels.shape
    centre = torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], -1) / stride
    cell = centre.floor().long()
    mask = mask.bool() & (cell[..., 0] >= 0) & (cell[..., 0] < width) & (cell[..., 1] >= 0) & (cell[..., 1] < height)
    if mask.any() and (labels[mask].min() < 0 or labels[mask].max() >= num_classes):
        raise ValueError(f"object labels must be in [0, {num_classes}), got {labels[mask].unique().tolist()}")
    size = (boxes[..., 2:] - boxes[..., :2]) / stride
    radius = gaussian_radius(size[..., 1], size[..., 0], min_overlap).floor().clamp_min(min_radius)
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    dy = ys.view(1, 1, -1, 1) - cell[..., 1, None, None].float()  # [B, M, H, 1]
    dx = xs.view(1, 1, 1, -1) - cell[..., 0, None, None].float()  # [B, M, 1, W]
    gauss = torch.exp(-(dx * dx + dy * dy) / (2 * sigma[..., None, None] ** 2))
    inside = (dx.abs() <= radius[..., None, None]) & (dy.abs() <= radius[..., None, None])
    gauss = gauss * inside * mask[..., None, None]
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).float() * mask[..., None]  # [B, M, K]
    if m:
        heatmap = (gauss[:, :, None] * onehot[..., None, None]).amax(dim=1)
    else:
        heatmap = boxes.new_zeros(b, num_classes, height, width)
    return {"heatmap": heatmap, "size": size, "offset": centre - cell.float(), "cell": cell.flip(-1), "mask": mask}


def gather_cells(maps: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Values of ``maps`` ``[B, D, H, W]`` at cells ``[B, M, 2]`` ``(y, x)``: ``[B, M, D]``
    (cells are clamped onto the map; mask the invalid ones yourself)."""
    b, d, h, w = maps.shape
    y, x = cell[..., 0].clamp(0, h - 1), cell[..., 1].clamp(0, w - 1)
    flat = (y * w + x).unsqueeze(1).expand(b, d, -1)  # [B, D, M]
    return maps.flatten(2).gather(2, flat).transpose(1, 2)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` ``[N, 4]`` with every box in ``b`` ``[M, 4]`` (x1, y1, x2, y2): ``[N, M]``."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))

