"""Object detection: the digit-canvas generator, CenterNet targets and decoding, NMS, COCO mAP, the
detection distillation losses, and a short training run."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

from distill import Distiller, Term, TrainConfig, Trainer
from distill.data import BatchLoader, load_dataset
from distill.data.digit_canvas import make_canvases
from distill.errors import DistillError
from distill.losses import box_kd_loss, centernet_loss, fg_feature_loss, get_loss, heatmap_kd_loss
from distill.losses.centernet import focal_loss
from distill.losses.fg_feature import foreground_weights
from distill.models.detection import CenterNet, create_detector, detector_names
from distill.tasks import detection as det

torch.set_num_threads(1)
HEADS = ["heatmap", "size", "offset"]


@pytest.fixture(scope="module")
def mnist(shared):
    return load_dataset("mnist", path=shared / "mnist")


def canvases(mnist, count=12, **options):
    return make_canvases(mnist.train.inputs[:500], mnist.train.targets[:500], count, **options)


def tiny_detector(width: int = 4) -> CenterNet:
    return CenterNet(widths=(width, width, 2 * width, 2 * width), neck=2 * width, head=2 * width)


def targets(boxes, labels):
    """A batch of one image's target dict from lists."""
    boxes = torch.tensor([boxes], dtype=torch.float32)
    labels = torch.tensor([labels])
    return {"boxes": boxes, "labels": labels, "mask": torch.ones_like(labels, dtype=torch.bool)}


# -- data -----------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded(mnist):
    a, b = canvases(mnist, seed=3), canvases(mnist, seed=3)
    for name in ("images", "boxes", "labels", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, canvases(mnist, seed=4).images)
    longer = canvases(mnist, count=20, seed=3)  # canvas i depends on (seed, split, i) only
    assert torch.equal(longer.images[:12], a.images)


def test_boxes_are_the_tight_boxes_of_each_digit(mnist):
    single = canvases(mnist, count=30, digits=(1, 1), scale=(14, 42), canvas_size=64)
    assert single.mask[:, 0].all()
    for image, box in zip(single.images[:, 0], single.boxes[:, 0].long()):
        x1, y1, x2, y2 = box.tolist()
        ink = image.nonzero()
        assert (ink[:, 1] >= x1).all() and (ink[:, 1] < x2).all() and (ink[:, 0] >= y1).all() and (ink[:, 0] < y2).all()
        # tight: every edge row and column of the box holds ink
        assert image[y1, x1:x2].any() and image[y2 - 1, x1:x2].any()
        assert image[y1:y2, x1].any() and image[y1:y2, x2 - 1].any()
        assert 14 <= max(x2 - x1, y2 - y1) <= 42


def test_canvases_hold_several_digits_with_limited_overlap(mnist):
    data = canvases(mnist, count=40, digits=(2, 5), max_iou=0.2)
    counts = data.mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 5 and counts.float().mean() > 2
    assert data.images.shape == (40, 1, 96, 96) and data.images.dtype == torch.uint8
    for image, boxes, mask, labels in zip(data.images[:, 0], data.boxes, data.mask, data.labels):
        boxes = boxes[mask]
        assert ((labels[mask] >= 0) & (labels[mask] <= 9)).all()
        assert (boxes >= 0).all() and (boxes <= 96).all()
        iou = det.box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert iou.max() <= 0.2 + 1e-6
        covered = torch.zeros_like(image, dtype=torch.bool)
        for x1, y1, x2, y2 in boxes.long().tolist():
            covered[y1:y2, x1:x2] = True
        assert not (image.bool() & ~covered).any()  # every ink pixel is inside some box


def test_registered_data_set_and_loader(shared):
    data = load_dataset("mnist-detection", path=shared / "mnist", train_images=10, test_images=6,
                        canvas_size=64, digits=[1, 3], scale=[14, 30])
    assert len(data.train) == 10 and len(data.test) == 6 and data.input_shape == (1, 64, 64)
    assert data.train.boxes.shape == (10, 3, 4)
    assert not torch.equal(data.train.images[:6], data.test.images)  # test canvases: other digits, other draws
    loader = det.DetectionLoader(data.train, 4, shuffle=True, seed=1, mean=data.mean, std=data.std)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert batches[0]["input"].shape == (4, 1, 64, 64) and batches[0]["target"]["boxes"].shape == (4, 3, 4)
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(10))
    again = list(det.DetectionLoader(data.train, 4, shuffle=True, seed=1, mean=data.mean, std=data.std))
    assert all(torch.equal(a["index"], b["index"]) for a, b in zip(batches, again))
    with pytest.raises(DistillError, match="DetectionLoader"):  # not a classification set
        BatchLoader(data.train, 4, shuffle=False)
    with pytest.raises(DistillError, match="scale"):
        load_dataset("mnist-detection", path=shared / "mnist", train_images=2, test_images=2, scale=[30, 20])


# -- targets, NMS, decoding -----------------------------------------------------------------------


def test_heatmap_peaks_at_object_centres():
    t = targets([[8, 12, 40, 36], [60, 4, 90, 40]], [3, 7])
    encoded = det.encode_targets(t["boxes"], t["labels"], t["mask"], 10, (24, 24), stride=4)
    heat = encoded["heatmap"][0]
    # centres (24, 24) / 4 = cell (6, 6) for class 3 and (75, 22) / 4 -> cell (18, 5) for class 7
    assert heat[3, 6, 6] == 1 and heat[7, 5, 18] == 1
    assert heat[3].argmax() == 6 * 24 + 6 and heat[7].argmax() == 5 * 24 + 18
    assert heat.eq(1).sum() == 2 and heat[[0, 1, 2, 4, 5, 6, 8, 9]].abs().sum() == 0
    assert 0 < heat[3, 6, 7] < 1
    assert math.isclose(heat[3, 6, 7], heat[3, 6, 5]) and math.isclose(heat[3, 6, 7], heat[3, 5, 6])
    assert torch.allclose(encoded["offset"][0], torch.tensor([[0.0, 0.0], [0.75, 0.5]]))
    assert torch.allclose(encoded["size"][0], torch.tensor([[8.0, 6.0], [7.5, 9.0]]))
    assert encoded["cell"][0].tolist() == [[6, 6], [5, 18]]


def test_gaussian_radius_keeps_the_minimum_overlap():
    h, w, t = torch.tensor([10.0, 40.0, 7.0]), torch.tensor([30.0, 12.0, 7.0]), 0.7
    r = det.gaussian_radius(h, w, t)
    shifted = (h - r) * (w - r) / (2 * h * w - (h - r) * (w - r))
    shrunk = (h - 2 * r) * (w - 2 * r) / (h * w)
    grown = h * w / ((h + 2 * r) * (w + 2 * r))
    ious = torch.stack([shifted, shrunk, grown])
    assert (ious >= t - 1e-5).all()  # no displacement within r loses more than the threshold
    assert torch.allclose(ious.min(0).values, torch.full((3,), t), atol=1e-5)  # and r is the largest such


def test_the_task_re_exports_the_box_geometry_of_distill_boxes():
    # the geometry lives in a low module the losses can import; older code reads it from the task
    from distill import boxes

    for name in ("STRIDE", "unpack_targets", "gaussian_radius", "encode_targets", "gather_cells", "box_iou"):
        assert getattr(det, name) is getattr(boxes, name), name


def test_batched_nms_against_a_hand_computed_case():
    boxes = torch.tensor([
        [0, 0, 10, 10],  # A .9
        [1, 1, 11, 11],  # B .8: IoU 81/119 = 0.68 with A, same class -> suppressed
        [1, 1, 11, 11],  # C .7: same place, another class -> kept
        [20, 20, 30, 30],  # D .6: alone -> kept
        [0, 0, 10, 5],  # E .95: IoU with A exactly 0.5, not above the threshold -> both kept
    ], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    labels = torch.tensor([0, 0, 1, 0, 0])
    assert det.batched_nms(boxes, scores, labels, 0.5).tolist() == [4, 0, 2, 3]
    # at 0.45 E suppresses A, and B survives: only boxes that are kept suppress others
    assert det.batched_nms(boxes, scores, labels, 0.45).tolist() == [4, 1, 2, 3]
    assert det.batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).tolist() == []


def perfect_outputs(t, num_classes=10, size=(24, 24), stride=4):
    """Head outputs that say exactly what the encoded targets say."""
    encoded = det.encode_targets(t["boxes"], t["labels"], t["mask"], num_classes, size, stride)
    heat = torch.logit(encoded["heatmap"].clamp(1e-4, 1 - 1e-4))
    wh, off = torch.zeros(1, 2, *size), torch.zeros(1, 2, *size)
    for (y, x), s, o in zip(encoded["cell"][0].tolist(), encoded["size"][0], encoded["offset"][0]):
        wh[0, :, y, x], off[0, :, y, x] = s, o
    return heat, wh, off


def test_decoding_round_trips_encoded_targets():
    t = targets([[3, 5, 20, 30], [40, 41, 77, 90], [50, 2, 63, 17]], [1, 9, 1])
    heat, wh, off = perfect_outputs(t)
    (found,) = det.decode(heat, wh, off, stride=4, score_threshold=0.5)
    order = found["boxes"][:, 0].argsort()
    assert torch.allclose(found["boxes"][order], t["boxes"][0], atol=1e-4)
    assert found["labels"][order].tolist() == [1, 9, 1]
    assert (found["scores"] > 0.999).all()


# -- the metric -----------------------------------------------------------------------------------


def test_map_of_perfect_predictions_is_one():
    truths = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 30]]), "labels": torch.tensor([0, 4])},
              {"boxes": torch.tensor([[5.0, 5, 25, 25]]), "labels": torch.tensor([2])}]
    predictions = [dict(t, scores=torch.full((len(t["labels"]),), 0.9)) for t in truths]
    result = det.coco_map(predictions, truths)
    assert math.isclose(result["map"], 1.0) and math.isclose(result["map50"], 1.0)


def test_map_of_a_known_mismatch():
    truths = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]]), "labels": torch.tensor([0, 0])}]
    # one box found, the other missed: recall 1/2 at precision 1; COCO's 101 recall points 0, .01, ..., .5 score 1
    missed = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    half = 51 / 101
    result = det.coco_map(missed, truths)
    assert math.isclose(result["map"], half, abs_tol=1e-9) and math.isclose(result["map50"], half, abs_tol=1e-9)
    # the second box predicted with IoU 100/150 = 2/3: a match at IoU thresholds .5, .55, .6, .65 only
    loose = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 45]]), "scores": torch.tensor([0.9, 0.8]),
              "labels": torch.tensor([0, 0])}]
    result = det.coco_map(loose, truths)
    assert math.isclose(result["map"], (4 * 1.0 + 6 * half) / 10, abs_tol=1e-9)
    assert math.isclose(result["map50"], 1.0)
    nothing = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert det.coco_map(nothing, truths) == {"map": 0.0, "map50": 0.0}


def test_missing_evaluator_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_pycocotools(name, *args, **kwargs):
        if name.startswith("pycocotools"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pycocotools)
    with pytest.raises(DistillError, match=r"distill\[detection\]"):
        det.coco_map([], [])


# -- losses ---------------------------------------------------------------------------------------


def test_centernet_loss_regression_parts_vanish_on_perfect_maps_and_train_every_head():
    t = targets([[3, 5, 20, 30], [40, 41, 77, 90]], [1, 9])
    heat, wh, off = perfect_outputs(t)
    encoded = det.encode_targets(t["boxes"], t["labels"], t["mask"], 10, (24, 24))
    assert torch.isclose(centernet_loss([heat, wh, off], t), focal_loss(heat, encoded["heatmap"]))
    outputs = [torch.zeros(1, 10, 24, 24, requires_grad=True), torch.zeros(1, 2, 24, 24, requires_grad=True),
               torch.zeros(1, 2, 24, 24, requires_grad=True)]
    centernet_loss(outputs, t).backward()
    assert all(o.grad.abs().sum() > 0 for o in outputs)
    with pytest.raises(ValueError, match=r"student: \[heatmap, size, offset\]"):
        centernet_loss(heat, t)


def test_heatmap_kd_is_zero_for_equal_maps_and_trains_the_student():
    torch.manual_seed(0)
    teacher = torch.randn(2, 10, 6, 6)
    assert heatmap_kd_loss(teacher.clone(), teacher, temperature=2.0).abs() < 1e-6
    student = torch.randn(2, 10, 6, 6, requires_grad=True)
    value = heatmap_kd_loss(student, teacher)
    value.backward()
    assert value > 0 and student.grad.abs().sum() > 0
    # one position, one class: the Bernoulli KL by hand
    p, q = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))
    by_hand = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    one = lambda v: torch.full((1, 1, 1, 1), v)  # noqa: E731
    assert torch.isclose(heatmap_kd_loss(one(-1.0), one(2.0), gamma=0.0), by_hand)
    assert torch.isclose(heatmap_kd_loss(one(-1.0), one(2.0)), (p - q) ** 2 * by_hand)  # focal modulation
    # agreeing background cells drop out: one disagreeing cell outweighs 99 nearly agreeing ones
    teacher, student = torch.full((1, 1, 10, 10), -6.0), torch.full((1, 1, 10, 10), -4.0)
    student[0, 0, 0, 0] = -3.0
    teacher[0, 0, 0, 0] = 3.0
    corner = (student[..., :1, :1], teacher[..., :1, :1])
    assert heatmap_kd_loss(student, teacher) / heatmap_kd_loss(*corner) < 1.001
    assert heatmap_kd_loss(student, teacher, gamma=0.0) / heatmap_kd_loss(*corner, gamma=0.0) > 1.3


def test_foreground_weights_by_hand():
    boxes = torch.tensor([[[0.0, 0, 8, 8], [0, 0, 16, 16], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True, False]])
    fg, bg = foreground_weights(boxes, mask, (6, 6), stride=4)
    # the small box covers cells (0..1, 0..1): 1/4 each; the large one cells (0..3, 0..3): 1/16 elsewhere
    assert torch.allclose(fg[0, :2, :2], torch.full((2, 2), 0.25))
    assert torch.allclose(fg[0, 2:4, :4], torch.full((2, 4), 1 / 16))
    assert torch.allclose(fg[0, :2, 2:4], torch.full((2, 2), 1 / 16))
    assert fg[0, 4:].sum() == 0 and fg[0, :, 4:].sum() == 0
    assert torch.allclose(bg[0][bg[0] > 0], torch.full((20,), 1 / 20)) and bg[0, :4, :4].sum() == 0


def test_fg_feature_weights_foreground_and_background_errors():
    t = targets([[0, 0, 8, 8]], [0])
    teacher = torch.zeros(1, 3, 6, 6)
    assert fg_feature_loss(teacher.clone(), teacher, t) == 0
    inside, outside = teacher.clone(), teacher.clone()
    inside[0, :, 0, 0] = 2.0  # squared error 4 at one of the box's 4 cells
    outside[0, :, 5, 5] = 2.0  # and at one of the 32 background cells
    assert torch.isclose(fg_feature_loss(inside, teacher, t, fg_weight=3.0, bg_weight=0.5), torch.tensor(3.0 * 4 / 4))
    assert torch.isclose(fg_feature_loss(outside, teacher, t, fg_weight=3.0, bg_weight=0.5), torch.tensor(0.5 * 4 / 32))
    student = torch.randn(1, 3, 6, 6, requires_grad=True)
    fg_feature_loss(student, teacher, t).backward()
    assert student.grad.abs().sum() > 0


def test_box_kd_is_zero_for_equal_maps_and_weighted_by_teacher_confidence():
    heat = torch.full((1, 10, 4, 4), -20.0)
    heat[0, 3, 1, 2] = 20.0  # the teacher sees one object, at (1, 2)
    size, offset = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4)
    assert box_kd_loss([size.clone(), offset.clone()], [heat, size, offset]) == 0
    away, near = size.clone(), size.clone()
    away[0, :, 3, 3] += 5.0
    near[0, :, 1, 2] += 5.0
    assert box_kd_loss([away, offset], [heat, size, offset]) < 1e-6
    assert torch.isclose(box_kd_loss([near, offset], [heat, size, offset]), torch.tensor(0.1 * 5.0), rtol=1e-4)
    student = [size.clone().requires_grad_(), offset.clone().requires_grad_()]
    box_kd_loss([student[0] + 1, student[1] - 1], [heat, size, offset]).backward()
    assert all(s.grad.abs().sum() > 0 for s in student)


def test_distiller_feeds_every_detection_term_and_each_trains_the_student(mnist):
    data = canvases(mnist, count=4)
    batch = next(iter(det.DetectionLoader(data, 4, shuffle=False)))
    torch.manual_seed(0)
    student, teacher = tiny_detector(4), tiny_detector(8)
    terms = [
        Term("det", "centernet", student=HEADS),
        Term("hkd", "heatmap_kd", student="heatmap", teacher="heatmap"),
        Term("fgd", "fg_feature", student="neck", teacher="neck"),
        Term("box", "box_kd", student=["size", "offset"], teacher=HEADS),
    ]
    distiller = Distiller(student, teacher, terms, feed=det.feed)
    report = distiller.dry_run(batch)
    assert report.problems == []
    assert "SpatialConvAdapter" in report.adapters["fgd"]  # 8 student channels -> 16 teacher channels
    assert report.student_taps["logits"] == report.student_taps["heatmap"] == (4, 10, 24, 24)
    assert get_loss("fg_feature").inputs == ("student", "teacher", "labels")


def test_detectors_are_registered_and_the_student_is_much_smaller():
    assert {"centernet", "centernet-teacher", "centernet-student"} <= set(detector_names())
    teacher, student = create_detector("centernet-teacher"), create_detector("centernet-student")
    ratio = sum(p.numel() for p in teacher.parameters()) / sum(p.numel() for p in student.parameters())
    assert 4 <= ratio <= 10
    out = student(torch.zeros(2, 1, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "heatmap": (2, 10, 16, 16), "size": (2, 2, 16, 16), "offset": (2, 2, 16, 16)}


def test_short_training_run_lowers_the_loss(mnist):
    data = canvases(mnist, count=32, canvas_size=64, scale=(14, 28))
    loader = det.DetectionLoader(data, 16, shuffle=True, mean=(0.07,), std=(0.22,))
    torch.manual_seed(0)
    distiller = Distiller(tiny_detector(8), None, [Term("det", "centernet", student=HEADS)], feed=det.feed)
    config = TrainConfig(epochs=6, lr=3e-3, schedule="constant", cpu=True, progress=False, tensorboard=False)
    history = Trainer(distiller, loader, config).fit()
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    predictions, truths = det.predict(distiller.student, det.DetectionLoader(data, 16, shuffle=False))
    assert len(predictions) == len(truths) == 32
