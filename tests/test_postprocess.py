"""Final outputs (top-5, detections, masks) and the tolerances that judge them against PyTorch's."""

import numpy as np

from mnv2_tvm import postprocess as P


def ssd_raw(boxes, scores):
    """A raw SSDLite output: normalised (ymin, xmin, ymax, xmax) boxes, then per-class scores."""
    return np.concatenate([np.asarray(boxes, np.float32), np.asarray(scores, np.float32)], axis=1)[None]


def test_overlapping_boxes_of_one_class_keep_the_best_and_other_classes_are_kept_apart():
    boxes = [[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 1.2]]
    scores = [[0, 0.9, 0.0], [0, 0.8, 0.0], [0, 0.0, 0.7], [0, 0.95, 0.1]]
    dets = P.detect(ssd_raw(boxes, scores), resolution=200)
    assert [(d["class"], round(d["score"], 2)) for d in dets] == [(1, 0.95), (1, 0.9), (2, 0.7)]
    assert np.allclose(dets[0]["box"], [120, 120, 180, 200])  # in input pixels, clipped to the image
    assert np.allclose(dets[1]["box"], [20, 20, 100, 100])


def test_nms_matches_the_one_box_at_a_time_definition():
    rng = np.random.default_rng(0)
    corner = rng.random((300, 2)) * 0.8
    boxes = np.concatenate([corner, corner + 0.05 + rng.random((300, 2)) * 0.3], axis=1)
    scores = rng.random(300)
    order, slow = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        slow.append(int(i))
        order = [j for j in order if P.iou(boxes[i], boxes[[j]])[0] <= 0.5]
    assert P.nms(boxes, scores, 0.5) == slow


def test_agreement_tolerates_float_noise_and_catches_a_moved_box():
    rng = np.random.default_rng(1)
    corner = rng.random((500, 2)) * 0.8
    boxes = np.concatenate([corner, corner + 0.05 + rng.random((500, 2)) * 0.3], axis=1)
    raw = ssd_raw(boxes, rng.random((500, 4)) * 0.6)
    ref = P.final_outputs("ssdlite", raw, 320)
    assert len(ref["detections"]) > 10
    noisy = raw + rng.normal(0, 1e-7, raw.shape).astype(np.float32)
    assert P.agreement("ssdlite", P.final_outputs("ssdlite", noisy, 320), ref)["ok"]
    moved = raw.copy()
    best = int(np.argmax(raw[0, :, 4:].max(1)))
    moved[0, best, :4] = [0.0, 0.0, 0.05, 0.05]
    verdict = P.agreement("ssdlite", P.final_outputs("ssdlite", moved, 320), ref)
    assert not verdict["ok"] and verdict["unmatched"] >= 1


def test_masks_agree_on_all_but_a_thousandth_of_the_pixels():
    logits = np.random.default_rng(2).random((1, 21, 100, 100)).astype(np.float32)
    ref = P.final_outputs("deeplabv3", logits, 100)
    assert ref["mask"].shape == (100, 100) and ref["mask"].dtype == np.uint8
    flipped = {"mask": ref["mask"].copy()}
    flipped["mask"].flat[:10] = (flipped["mask"].flat[:10] + 1) % 21
    assert P.agreement("deeplabv3", flipped, ref)["ok"]  # 0.1 % of the pixels
    flipped["mask"].flat[:11] = (ref["mask"].flat[:11] + 1) % 21
    assert not P.agreement("deeplabv3", flipped, ref)["ok"]


def test_top5_is_sorted_and_a_different_class_is_caught():
    logits = np.arange(1000, dtype=np.float32)[None] / 100
    top = P.final_outputs("mobilenet_v2", logits, 224)
    assert [t["class"] for t in top["top"]] == [999, 998, 997, 996, 995]
    other = logits.copy()
    other[0, 3] = 20
    assert not P.agreement("mobilenet_v2", P.final_outputs("mobilenet_v2", other, 224), top, logits)["ok"]
    assert P.agreement("mobilenet_v2", P.final_outputs("mobilenet_v2", logits + 1e-7, 224), top, logits)["ok"]
