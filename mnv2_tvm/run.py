"""Run a bundle on this machine and present its output: top-k, detections or a mask."""

from __future__ import annotations

import statistics
from pathlib import Path

from .bundle import Runner, reference
from .errors import UserError
from .models import ModelConfig, preprocess_image

def voc_palette() -> list[int]:
    """PASCAL VOC's colour map: the bits of the class id spread over R, G and B."""
    palette = []
    for c in range(256):
        r = g = b = 0
        cid = c
        for shift in range(7, -1, -1):
            r |= ((cid >> 0) & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
        palette += [r, g, b]
    return palette


def run_bundle(bundle_dir: Path, image: Path | None = None, save: Path | None = None,
               time_it: bool = False, top: int = 5) -> dict:
    import numpy as np

    runner = Runner(bundle_dir)
    cfg = ModelConfig.from_dict(runner.manifest["config"])
    if save and cfg.model == "mobilenet_v2":
        raise UserError("--save writes a mask (deeplabv3) or boxes (ssdlite); a classifier has neither")
    if image is not None:
        x = preprocess_image(image, cfg)
    else:
        x, _ = reference(bundle_dir)
    out = runner.run(x)
    result: dict = {"model": cfg.label}
    print(f"{cfg.label} on {runner.manifest['target']} ({'image ' + str(image) if image else 'fixed random input'})")
    if cfg.model == "mobilenet_v2":
        logits = out[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = np.argsort(-p)[:top]
        result["top"] = [(int(i), float(p[i])) for i in best]
        for rank, (i, prob) in enumerate(result["top"], 1):
            print(f"  {rank}. class {i:4d}  p={prob:.4f}")
    elif cfg.model == "ssdlite":
        from .models.ssdlite import postprocess

        dets = postprocess(out)
        result["detections"] = dets
        print(f"  {len(dets)} detections above the score threshold")
        for d in dets[:top]:
            print(f"  class {d['class']:3d}  score {d['score']:.3f}  box (ymin, xmin, ymax, xmax) "
                  + ", ".join(f"{v:.3f}" for v in d["box"]))
        if save:
            _save_boxes(save, dets, image, cfg)
    else:
        from .models.deeplab import postprocess

        seg = postprocess(out)
        result["classes"] = seg["classes"]
        shares = sorted(seg["classes"].items(), key=lambda kv: -kv[1])
        print(f"  mask {seg['mask'].shape[1]}x{seg['mask'].shape[0]}: "
              + ", ".join(f"class {c} {share:.1%}" for c, share in shares[:top]))
        if save:
            _save_mask(save, seg["mask"])
    if save:
        print(f"  saved {save}")
    if time_it:
        times = runner.time(x, number=5, repeat=5)
        result["median_ms"] = statistics.median(times) * 1e3
        madds = runner.manifest["madds"]
        print(f"  latency {result['median_ms']:.2f} ms (median of 5x5), {madds / 1e6:,.0f}M MAdds, "
              f"{2 * madds / (result['median_ms'] * 1e-3) / 1e9:.1f} GFLOP/s")
    return result


def _save_mask(path: Path, mask) -> None:
    from PIL import Image

    img = Image.fromarray(mask, mode="P")
    img.putpalette(voc_palette())
    _save(img, path)


def _save_boxes(path: Path, dets: list[dict], image: Path | None, cfg: ModelConfig) -> None:
    from PIL import Image, ImageDraw

    size = cfg.resolution
    if image is not None:
        with Image.open(image) as src:
            canvas = src.convert("RGB")
    else:
        canvas = Image.new("RGB", (size, size), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    palette = voc_palette()
    for d in dets:
        y0, x0, y1, x1 = d["box"]
        colour = tuple(palette[3 * (d["class"] % 255 + 1): 3 * (d["class"] % 255 + 1) + 3])
        draw.rectangle([x0 * w, y0 * h, x1 * w, y1 * h], outline=colour, width=2)
        draw.text((x0 * w + 2, y0 * h + 1), f"{d['class']} {d['score']:.2f}", fill=colour)
    _save(canvas, path)


def _save(img, path: Path) -> None:
    try:
        img.save(path, format="PNG")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
