"""Final outputs from the networks' raw tensors: top-5 classes, detections after NMS, class masks.

NumPy only, and nothing from the rest of the package: ``compile`` copies this file into every
bundle beside ``runner.py``, so a board with only the TVM runtime produces what a user wants
(detections, masks) rather than a raw tensor to ship back. The host's ``run`` uses the same
functions, so the board's answer and the host's are computed by one piece of code.

Agreement with PyTorch is judged on these final outputs, with tolerances for the one thing a
float difference of 1e-6 can legitimately change: a decision taken at a threshold or a tie.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP = 5
SCORE_THRESHOLD = 0.3
IOU_THRESHOLD = 0.6
MAX_DETECTIONS = 100
# Final outputs agree with the reference when: the top-5 classes are the same (order may differ
# only between near-equal probabilities); every detection has a partner of the same class with
# IoU >= MATCH_IOU (a detection whose score is within DECISION_MARGIN of the threshold, or
# suppressed by a near-threshold overlap, may be missing on one side); and the class masks are
# equal on at least MASK_AGREEMENT of the pixels (argmax may flip where two logits tie).
MATCH_IOU = 0.99
MASK_AGREEMENT = 0.999
DECISION_MARGIN = 1e-4


def classify(logits: np.ndarray, top: int = TOP) -> list[dict[str, Any]]:
    """Softmax over the classifier's logits, the ``top`` classes best first."""
    z = logits.reshape(-1).astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    best = np.argsort(-p, kind="stable")[:top]
    return [{"class": int(i), "p": float(p[i])} for i in best]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best first.

    The pairwise IoU matrix is computed once, so the greedy pass is a cheap loop over rows."""
    order = np.argsort(-scores, kind="stable")
    overlaps = iou_matrix(boxes[order]) > iou_threshold
    suppressed = np.zeros(order.size, dtype=bool)
    keep: list[int] = []
    for i in range(order.size):
        if not suppressed[i]:
            keep.append(int(order[i]))
            suppressed |= overlaps[i]
    return keep


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of (ymin, xmin, ymax, xmax) boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    y0, x0, y1, x1 = (b[:, k] for k in range(4))
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    inter = ih * iw
    area = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    return inter / np.maximum(area[:, None] + area - inter, 1e-12)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with each of ``boxes``."""
    return iou_matrix(np.vstack([np.asarray(box, dtype=np.float64).reshape(1, 4),
                                 np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]))[0, 1:]


def detect(raw: np.ndarray, resolution: int, score_threshold: float = SCORE_THRESHOLD,
           iou_threshold: float = IOU_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> list[dict[str, Any]]:
    """Per-class NMS over SSDLite's decoded boxes (class 0 is background).

    As in TensorFlow's detection API, each class's NMS sees only its ``max_detections`` best
    candidates above the threshold, which bounds the work on a board's CPU. Boxes come out in
    input pixels, (ymin, xmin, ymax, xmax), clipped to the image; sorted by score."""
    boxes, scores = raw[0, :, :4].astype(np.float64), raw[0, :, 4:]
    dets: list[dict[str, Any]] = []
    for cls in range(1, scores.shape[1]):
        cand = np.nonzero(scores[:, cls] > score_threshold)[0]
        if cand.size == 0:
            continue
        if cand.size > max_detections:
            cand = cand[np.argsort(-scores[cand, cls], kind="stable")[:max_detections]]
        for i in nms(boxes[cand], scores[cand, cls], iou_threshold)[:max_detections]:
            box = np.clip(boxes[cand[i]], 0.0, 1.0) * resolution
            dets.append({"class": cls, "score": float(scores[cand[i], cls]), "box": [float(v) for v in box]})
    dets.sort(key=lambda d: -d["score"])
    return dets[:max_detections]


def segment(mask_logits: np.ndarray) -> np.ndarray:
    """The class of each pixel (argmax over the class axis)."""
    return mask_logits[0].argmax(0).astype(np.uint8)


def class_shares(mask: np.ndarray) -> dict[int, float]:
    classes, counts = np.unique(mask, return_counts=True)
    return {int(c): float(n) / mask.size for c, n in zip(classes, counts)}


def final_outputs(model: str, raw: np.ndarray, resolution: int) -> dict[str, Any]:
    """What a user wants of each model: top-5, detections or a mask (as a NumPy array)."""
    if model == "mobilenet_v2":
        return {"top": classify(raw)}
    if model == "ssdlite":
        return {"detections": detect(raw, resolution)}
    if model == "deeplabv3":
        return {"mask": segment(raw)}
    raise ValueError(f"no final outputs for model {model!r}")


def agreement(model: str, got: dict[str, Any], ref: dict[str, Any], ref_raw: np.ndarray | None = None) -> dict[str, Any]:
    """How far ``got``'s final outputs are from ``ref``'s, and whether that is within the tolerances above.

    ``ref_raw`` (the reference's raw tensor) lets a top-5 order swap or a missing detection be
    excused when the reference itself sits at a tie or a threshold."""
    if model == "mobilenet_v2":
        g = [t["class"] for t in got["top"]]
        r = [t["class"] for t in ref["top"]]
        probs = {t["class"]: t["p"] for t in ref["top"]}
        same_set = set(g) == set(r)
        order_ok = all(a == b or abs(probs.get(a, -1) - probs.get(b, -1)) < DECISION_MARGIN for a, b in zip(g, r))
        if not same_set and ref_raw is not None:  # the 5th and 6th classes may tie
            p = np.sort(np.asarray([t["p"] for t in ref["top"]]))
            same_set = len(set(g) ^ set(r)) == 2 and p[0] - _sixth(ref_raw) < DECISION_MARGIN
        return {"top5_equal": g == r, "ok": bool(same_set and order_ok)}
    if model == "ssdlite":
        unmatched_ref = _unmatched(ref["detections"], got["detections"])
        unmatched_got = _unmatched(got["detections"], ref["detections"])
        excused = all(abs(d["score"] - SCORE_THRESHOLD) < DECISION_MARGIN for d in unmatched_ref + unmatched_got)
        return {"detections": len(got["detections"]), "reference_detections": len(ref["detections"]),
                "unmatched": len(unmatched_ref) + len(unmatched_got),
                "ok": bool(not (unmatched_ref or unmatched_got) or excused)}
    if model == "deeplabv3":
        share = float(np.mean(got["mask"] == ref["mask"]))
        return {"mask_agreement": share, "ok": share >= MASK_AGREEMENT}
    raise ValueError(f"no final outputs for model {model!r}")


def _sixth(raw: np.ndarray) -> float:
    p = classify(raw, top=TOP + 1)
    return p[-1]["p"]


def _unmatched(these: list[dict[str, Any]], others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The detections of ``these`` with no partner of the same class at IoU >= MATCH_IOU in ``others``."""
    out = []
    for d in these:
        same = [o["box"] for o in others if o["class"] == d["class"]]
        if not same or iou(np.asarray(d["box"]), np.asarray(same)).max() < MATCH_IOU:
            out.append(d)
    return out


def summary(model: str, final: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able digest of final outputs (a mask becomes its size and class shares)."""
    if model == "deeplabv3":
        mask = final["mask"]
        return {"mask_shape": list(mask.shape), "classes": class_shares(mask)}
    return final
