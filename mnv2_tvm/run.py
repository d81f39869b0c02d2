"""Run a bundle on this machine and present its output: top-k, detections or a mask."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from . import postprocess
from .bundle import Runner, reference
from .errors import UserError
from .models import ModelConfig, preprocess_image, read_image

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
    runner = Runner(bundle_dir)
    cfg = ModelConfig.from_dict(runner.manifest["config"])
    if save and cfg.model == "mobilenet_v2":
        raise UserError("--save writes a mask (deeplabv3) or boxes (ssdlite); a classifier has neither")
    ref_raw = None
    if image is not None:
        x = preprocess_image(image, cfg)
    else:
        x, ref_raw = reference(bundle_dir)
    out = runner.run(x)
    t0 = time.perf_counter()
    final = postprocess.final_outputs(cfg.model, out, cfg.resolution)
    post_ms = (time.perf_counter() - t0) * 1e3
    result: dict = {"model": cfg.label, "postprocess_ms": post_ms, **postprocess.summary(cfg.model, final)}
    print(f"{cfg.label} on {runner.manifest['target']} ({'image ' + str(image) if image else 'fixed random input'})")
    if cfg.model == "mobilenet_v2":
        for rank, t in enumerate(final["top"][:top], 1):
            print(f"  {rank}. class {t['class']:4d}  p={t['p']:.4f}")
    elif cfg.model == "ssdlite":
        dets = final["detections"]
        print(f"  {len(dets)} detections above the score threshold")
        for d in dets[:top]:
            print(f"  class {d['class']:3d}  score {d['score']:.3f}  box (ymin, xmin, ymax, xmax) in input pixels "
                  + ", ".join(f"{v:.1f}" for v in d["box"]))
        if save:
            _save_boxes(save, dets, image, cfg)
    else:
        shares = sorted(result["classes"].items(), key=lambda kv: -kv[1])
        print(f"  mask {final['mask'].shape[1]}x{final['mask'].shape[0]}: "
              + ", ".join(f"class {c} {share:.1%}" for c, share in shares[:top]))
        if save:
            _save_mask(save, final["mask"])
    print(f"  post-processing {post_ms:.2f} ms")
    if ref_raw is not None:
        ref = postprocess.final_outputs(cfg.model, ref_raw, cfg.resolution)
        result["agreement"] = agree = postprocess.agreement(cfg.model, final, ref, ref_raw)
        print(f"  final outputs {'match' if agree['ok'] else 'DIFFER FROM'} PyTorch's: "
              + ", ".join(f"{k} {v}" for k, v in agree.items() if k != "ok"))
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
        canvas = read_image(image)
    else:
        canvas = Image.new("RGB", (size, size), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    sx, sy = canvas.size[0] / size, canvas.size[1] / size  # boxes are in the network input's pixels
    palette = voc_palette()
    for d in dets:
        y0, x0, y1, x1 = d["box"]
        colour = tuple(palette[3 * (d["class"] % 255 + 1): 3 * (d["class"] % 255 + 1) + 3])
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=colour, width=2)
        draw.text((x0 * sx + 2, y0 * sy + 1), f"{d['class']} {d['score']:.2f}", fill=colour)
    _save(canvas, path)


def _save(img, path: Path) -> None:
    try:
        img.save(path, format="PNG")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
