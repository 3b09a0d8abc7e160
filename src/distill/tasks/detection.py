"""Object detection, CenterNet style (Zhou, Wang & Krähenbühl 2019, "Objects as Points").

A batch (built by :class:`DetectionLoader`):

    {"input": float [B, C, H, W],
     "target": {"boxes": float [B, M, 4], "labels": int64 [B, M], "mask": bool [B, M]},
     "index": int64 [B]}

``boxes`` are ``(x1, y1, x2, y2)`` in input pixels (pixel ``j`` covers ``[j, j + 1)``), padded to
the ``M`` objects of the fullest image; ``mask`` says which rows are real objects. The objective
hands ``batch["target"]`` (this dict) to losses that read ``"labels"``.

A detector (:mod:`distill.models.detection`) maps ``[B, C, H, W]`` to a dict of head outputs at
stride ``s`` (4 here): ``heatmap`` ``[B, K, H/s, W/s]`` (class logits, one sigmoid per class),
``size`` ``[B, 2, H/s, W/s]`` (box width and height in output cells) and ``offset``
``[B, 2, H/s, W/s]`` (the centre's sub-cell position). The taps ``heatmap``, ``size``, ``offset``
and ``neck`` name those outputs and the feature the heads read; ``logits`` is the heat-map.

- :func:`encode_targets`: boxes -> Gaussian class heat-maps with CornerNet's radius rule, and the
  size/offset regression targets at each object's centre cell (it and the other box geometry,
  :func:`unpack_targets`, :func:`gaussian_radius`, :func:`gather_cells` and :func:`box_iou`, live in
  :mod:`distill.boxes`, where the losses read them too, and are re-exported here);
- the training loss is the registered ``centernet`` loss (:mod:`distill.losses.centernet`):
  penalty-reduced focal loss + 0.1 L1 size + L1 offset, reading ``student: [heatmap, size, offset]``
  and the labels;
- :func:`decode`: 3×3 max-pool peaks, top-K, score threshold, class-wise NMS (:func:`batched_nms`);
- :func:`coco_map`: COCO mAP@[.5:.95] and mAP@0.5 with pycocotools (the ``detection`` extra).

Distillation terms (``benchmarks/detection.py`` runs them):

    distiller = Distiller(student, teacher, feed=detection.feed, terms=[
        Term("det", "centernet", student=["heatmap", "size", "offset"]),
        Term("hkd", "heatmap_kd", weight=0.3, student="heatmap", teacher="heatmap"),
        Term("fgd", "fg_feature", weight=0.01, student="neck", teacher="neck"),     # reads the boxes too
        Term("box", "box_kd", student=["size", "offset"], teacher=["heatmap", "size", "offset"]),
    ])

The trainer moves a batch's top-level tensors to the device; the losses move the target dict's
tensors to their predictions' device themselves.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the box geometry lives in the low module distill.boxes (the losses read it too); re-exported here
from distill.boxes import (  # noqa: F401
    STRIDE, box_iou, encode_targets, gather_cells, gaussian_radius, unpack_targets,
)
from distill.data.loader import derive_seed
from distill.data.types import DetectionSet
from distill.errors import DistillError
from distill.signals import Batch

HEADS = ("heatmap", "size", "offset")


def feed(model: nn.Module, batch: Batch) -> Any:
    """Detection feed: ``model(batch["input"])`` -> a dict of head outputs."""
    return model(batch["input"])


# -- batches ------------------------------------------------------------------------------------


class DetectionLoader:
    """Batches of a :class:`~distill.data.types.DetectionSet` for :class:`distill.Trainer`.

    ``input``: float32 ``[b, C, H, W]``, uint8 scaled to [0, 1] then normalised with ``mean``/``std``;
    ``target``: the dict described in the module docstring (``M`` is the data set's padding);
    ``index``: int64 ``[b]``. Shuffling is a function of ``(seed, epoch)`` only, and ranks take the
    ``[rank::world_size]`` slice of the global batch, as :class:`distill.data.BatchLoader` does.
    """

    def __init__(
        self,
        dataset: DetectionSet,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DistillError(f"batch size must be a positive integer, got {batch_size!r}")
        if (mean is None) != (std is None):
            raise DistillError("give both mean and std for normalisation, or neither")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        x = dataset.images.float().div(255) if dataset.images.dtype == torch.uint8 else dataset.images.float()
        if mean is not None:
            shape = (1, -1, 1, 1)
            x = (x - torch.tensor(mean, dtype=torch.float32).reshape(shape)) / torch.tensor(
                std, dtype=torch.float32
            ).reshape(shape)
        self._inputs = x.contiguous()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.batch_size % self.world_size:
            raise DistillError(
                f"batch size {self.batch_size} is not divisible by the {self.world_size} processes"
            )
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed("order", self.seed, self.epoch))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for k in range(len(self)):
            index = order[k * self.batch_size:(k + 1) * self.batch_size][self.rank::self.world_size]
            yield {
                "input": self._inputs[index],
                "target": {
                    "boxes": self.dataset.boxes[index],
                    "labels": self.dataset.labels[index],
                    "mask": self.dataset.mask[index],
                },
                "index": index,
            }


# -- decoding -----------------------------------------------------------------------------------


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-wise greedy non-maximum suppression.

    Going down the scores, a box is kept unless a kept box *of the same label* overlaps it with
    IoU > ``iou_threshold``. ``boxes`` ``[N, 4]``, ``scores`` ``[N]``, ``labels`` ``[N]``; returns
    the kept indices (int64), highest score first.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    boxes, labels = boxes[order], labels[order]
    overlap = (box_iou(boxes, boxes) > iou_threshold) & (labels[:, None] == labels[None, :])
    # N is the top-K (<= 100 by default): plain Python over the overlap matrix beats one small
    # tensor operation per box
    rows = overlap.tolist()
    suppressed = [False] * len(rows)
    keep = []
    for i, row in enumerate(rows):
        if not suppressed[i]:
            keep.append(i)
            suppressed = [gone or hit for gone, hit in zip(suppressed, row)]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


@torch.no_grad()
def decode(
    heatmap: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    *,
    stride: int = STRIDE,
    k: int = 100,
    score_threshold: float = 0.01,
    nms_iou: float | None = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """Detections from head outputs: per image ``{"boxes" [n, 4], "scores" [n], "labels" [n]}``.

    ``heatmap`` ``[B, K, H, W]`` are logits. A cell is a peak when its sigmoid score equals the
    maximum of its 3×3 neighbourhood (CenterNet's replacement for NMS); the ``k`` best peaks
    over all classes are kept if they score at least ``score_threshold``. A peak at cell ``(y, x)``
    with offset ``(ox, oy)`` and size ``(w, h)`` gives the box centred at
    ``((x + ox) · stride, (y + oy) · stride)`` of ``(w · stride) × (h · stride)`` pixels. Class-wise
    NMS at ``nms_iou`` then removes duplicates that peak in neighbouring cells (``None``: no NMS).
    """
    b, classes, h, w = heatmap.shape
    scores = torch.sigmoid(heatmap.float())
    peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)
    top, flat = peaks.flatten(1).topk(min(k, classes * h * w), dim=1)
    label = flat // (h * w)
    cell = flat % (h * w)
    cy, cx = (cell // w), (cell % w)
    wh = gather_cells(size.float(), torch.stack([cy, cx], -1)).clamp_min(0) * stride
    off = gather_cells(offset.float(), torch.stack([cy, cx], -1))
    centre_x = (cx.float() + off[..., 0]) * stride
    centre_y = (cy.float() + off[..., 1]) * stride
    boxes = torch.stack(
        [centre_x - wh[..., 0] / 2, centre_y - wh[..., 1] / 2, centre_x + wh[..., 0] / 2, centre_y + wh[..., 1] / 2], -1
    )
    out = []
    for i in range(b):
        keep = top[i] >= score_threshold
        bx, sc, lb = boxes[i][keep], top[i][keep], label[i][keep]
        if nms_iou is not None:
            kept = batched_nms(bx, sc, lb, nms_iou)
            bx, sc, lb = bx[kept], sc[kept], lb[kept]
        out.append({"boxes": bx.cpu(), "scores": sc.cpu(), "labels": lb.cpu()})
    return out


@torch.no_grad()
def predict(
    model: nn.Module,
    loader,
    *,
    stride: int = STRIDE,
    k: int = 100,
    score_threshold: float = 0.01,
    nms_iou: float | None = 0.5,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Decoded detections and ground truth (``{"boxes", "labels"}`` per image) over ``loader``."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    predictions, truths = [], []
    for batch in loader:
        out = feed(model, {"input": batch["input"].to(device)})
        predictions += decode(out["heatmap"], out["size"], out["offset"], stride=stride, k=k,
                              score_threshold=score_threshold, nms_iou=nms_iou)
        boxes, labels, mask = unpack_targets(batch["target"])
        truths += [{"boxes": boxes[i][mask[i]].cpu(), "labels": labels[i][mask[i]].cpu()} for i in range(len(boxes))]
    model.train(was_training)
    return predictions, truths


# -- the metric ---------------------------------------------------------------------------------


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DistillError(
            "detection mAP needs pycocotools: pip install 'distill[detection]' (or pip install pycocotools)"
        ) from None
    return COCO, COCOeval


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.double()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1).tolist()


def coco_map(
    predictions: Sequence[dict[str, torch.Tensor]],
    truths: Sequence[dict[str, torch.Tensor]],
    num_classes: int = 10,
) -> dict[str, float]:
    """COCO box AP, evaluated by pycocotools' ``COCOeval``: ``map`` (mAP@[.5:.95], all areas, up to
    100 detections per image) and ``map50`` (mAP@0.5).

    ``predictions[i]``: ``{"boxes" [n, 4] (x1, y1, x2, y2), "scores" [n], "labels" [n]}`` for image
    ``i``; ``truths[i]``: ``{"boxes" [m, 4], "labels" [m]}``. No detection at all gives 0.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    COCO, COCOeval = _pycocotools()
    images, annotations, detections = [], [], []
    for i, (pred, truth) in enumerate(zip(predictions, truths)):
        images.append({"id": i + 1})
        for box, label in zip(_xywh(truth["boxes"]), truth["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist()):
            detections.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": box, "score": float(score)})
    if not detections or not annotations:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map": max(0.0, float(stats[0])), "map50": max(0.0, float(stats[1]))}


def detection_metrics(model: nn.Module, loader, num_classes: int = 10, **decode_options) -> dict[str, float]:
    """``coco_map`` of ``model`` over ``loader`` (a :class:`DetectionLoader` of the test split)."""
    predictions, truths = predict(model, loader, **decode_options)
    return coco_map(predictions, truths, num_classes)


# -- the task (recipes: `task: detection`) --------------------------------------------------------
from dataclasses import dataclass as _dataclass  # noqa: E402

from distill.tasks.base import TASKS, Task  # noqa: E402


@_dataclass
class PreparedDetection:
    """What :meth:`DetectionTask.prepare` loads once for a run."""

    data: Any
    train: Any
    test_loader: DetectionLoader
    val_loader: DetectionLoader | None
    norm: dict


@TASKS.register("detection")
class DetectionTask(Task):
    """Boxes and classes on images (``mnist-detection``): COCO mAP@[.5:.95] (primary) and mAP@0.5.

    Models come from :mod:`distill.models.detection` (``model: centernet-student``); the
    ground-truth loss is ``centernet`` (the teacher is trained with it; give it to the baseline and
    distill stages too). ``data.val_fraction`` holds out training canvases for validation.
    """

    name = "detection"
    primary_metric = "map"
    label_term = {"name": "gt", "loss": "centernet", "student": list(HEADS)}
    teacher_cache = None
    feed = staticmethod(feed)

    def prepare(self, recipe, data_dir) -> PreparedDetection:
        from distill.data import load_dataset

        data = load_dataset(recipe.data.name, data_dir, **recipe.data.options)
        if not isinstance(data.train, DetectionSet):
            raise DistillError(f"data set '{recipe.data.name}' has no boxes; task 'detection' needs one such as mnist-detection")
        norm = dict(mean=data.mean, std=data.std)
        train, val_loader = data.train, None
        if recipe.data.val_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.data.seed))
            cut = max(1, int(round(len(train) * recipe.data.val_fraction)))
            val_loader = DetectionLoader(train.subset(order[:cut]), recipe.data.eval_batch_size, shuffle=False, **norm)
            train = train.subset(order[cut:])
        test_loader = DetectionLoader(data.test, recipe.data.eval_batch_size, shuffle=False, **norm)
        return PreparedDetection(data, train, test_loader, val_loader, norm)

    def describe(self, prepared: PreparedDetection) -> str:
        shape = "x".join(map(str, prepared.data.input_shape[1:]))
        return (f"{prepared.data.name}: {len(prepared.train)} train, {len(prepared.data.test)} test canvases "
                f"of {shape}, {prepared.data.num_classes} classes")

    def train_loader(self, recipe, prepared: PreparedDetection, batch_size: int, seed: int, labelled_only: bool = False) -> DetectionLoader:
        return DetectionLoader(prepared.train, batch_size, shuffle=True, seed=seed,
                               drop_last=len(prepared.train) > batch_size, **prepared.norm)

    def build_model(self, spec, prepared: PreparedDetection, seed: int) -> nn.Module:
        from distill.models.detection import create_detector
        from distill.models.weights import load_weights

        torch.manual_seed(seed)
        model = create_detector(spec.model, prepared.data.num_classes, prepared.data.input_shape[0], **spec.kwargs)
        if spec.weights is not None:
            load_weights(model, spec.weights)
        return model

    def evaluate(self, model: nn.Module, prepared: PreparedDetection, reference=None, split: str = "test") -> dict[str, float]:
        loader = prepared.test_loader if split == "test" else prepared.val_loader
        return detection_metrics(model, loader, prepared.data.num_classes)

    def raw_training_inputs(self, prepared: PreparedDetection):
        """The training images as stored (a detection set's ``inputs`` refuses, naming the task)."""
        return prepared.data.train.images

    def latency_input(self, prepared: PreparedDetection):
        return next(iter(prepared.test_loader))["input"][:1]

    def example_inputs(self, prepared: PreparedDetection, n: int):
        """The first ``n`` test images as the model sees them (what an export's parity check runs)."""
        from distill.tasks.base import first_inputs

        return first_inputs(prepared.test_loader, n)
