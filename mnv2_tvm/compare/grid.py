"""The grid of a compare run: built-in grids and grid files (JSON or TOML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models import ModelConfig

DEFAULT_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)
DEFAULT_RESOLUTIONS = (96, 128, 160, 192, 224)
#: ``--grid quick`` (the main job's compact run): a 27x MAdd range in 12 builds, a few minutes on
#: 2 cores. Untuned 1.0/224 alone runs ~165 ms; compiling (~10 s a build) dominates.
QUICK_WIDTHS = (0.35, 1.0)
QUICK_RESOLUTIONS = (96, 160, 224)
#: The configuration whose tuned per-layer profile makes the layer-share plot.
REFERENCE_CONFIG = ModelConfig("mobilenet_v2", 1.0, 224)

_CONFIG_KEYS = ("model", "width", "resolution", "num_classes", "output_stride", "batch")
_LIST_KEYS = {"widths": "width", "resolutions": "resolution"}


def default_grid() -> list[ModelConfig]:
    """The paper's MobileNetV2 width × resolution grid, then SSDLite 320 and DeepLabv3 513."""
    grid = [ModelConfig("mobilenet_v2", w, r) for w in DEFAULT_WIDTHS for r in DEFAULT_RESOLUTIONS]
    return grid + [ModelConfig("ssdlite"), ModelConfig("deeplabv3")]


def quick_grid() -> list[ModelConfig]:
    """A compact MobileNetV2 grid: widths 0.35 and 1.0 × resolutions 96, 160 and 224."""
    return [ModelConfig("mobilenet_v2", w, r) for w in QUICK_WIDTHS for r in QUICK_RESOLUTIONS]


#: Built-in grids by name; ``--grid NAME`` picks one, anything else is a grid file.
GRIDS = {"default": default_grid, "quick": quick_grid}


def grid_configs(grid: str | Path) -> list[ModelConfig]:
    """The configurations of a built-in grid (:data:`GRIDS`) or of a grid file (:func:`load_grid`)."""
    named = GRIDS.get(str(grid).lower())
    return named() if named is not None else load_grid(grid)


def load_grid(path: str | Path) -> list[ModelConfig]:
    """Configurations from a JSON or TOML file.

    JSON: a list of objects (or ``{"configs": [...]}``); TOML: ``[[configs]]`` tables. Each entry
    has the fields of :class:`ModelConfig` (``model``, ``width``, ``resolution``, ``num_classes``,
    ``output_stride``, ``batch``); ``widths`` / ``resolutions`` lists expand to their product.
    Duplicates are dropped; order is kept. Any problem is a :class:`UserError` naming the entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"grid file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"grid file {path} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"grid file {path} cannot be read ({e.__class__.__name__})") from None
    if not text.strip():
        raise UserError(f"grid file {path} is empty; list configurations, e.g. "
                        '[{"model": "mobilenet_v2", "width": 1.0, "resolution": 224}]')
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"grid file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                            f"column {e.colno}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"grid file {path} is not valid TOML: {e}") from None
    else:
        raise UserError(f"grid file {path} must end in .json or .toml")
    if isinstance(data, dict):
        extra = sorted(set(data) - {"configs"})
        if extra or "configs" not in data:
            raise UserError(f"grid file {path} must hold a list of configurations"
                            + (" (a JSON list, or a 'configs' key)" if suffix == ".json"
                               else " as [[configs]] tables")
                            + (f"; unexpected keys: {', '.join(extra)}" if extra else ""))
        data = data["configs"]
    if not isinstance(data, list):
        raise UserError(f"grid file {path} must hold a list of configurations, not a {type(data).__name__}")
    if not data:
        raise UserError(f"grid file {path} lists no configurations")
    grid: list[ModelConfig] = []
    for i, entry in enumerate(data, 1):
        for cfg in _expand_entry(entry, f"grid file {path}, entry {i}"):
            if cfg not in grid:
                grid.append(cfg)
    return grid


def _expand_entry(entry: Any, where: str) -> list[ModelConfig]:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a table of config fields, not {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_CONFIG_KEYS) - set(_LIST_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                        f"known: {', '.join(_CONFIG_KEYS + tuple(_LIST_KEYS))}")
    for plural, singular in _LIST_KEYS.items():
        if plural in entry and singular in entry:
            raise UserError(f"{where}: give either '{singular}' or '{plural}', not both")
    if "model" not in entry:
        raise UserError(f"{where}: missing field 'model'")
    fields = {k: v for k, v in entry.items() if k in _CONFIG_KEYS}
    lists = {}
    for plural, singular in _LIST_KEYS.items():
        if plural in entry:
            values = entry[plural]
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}: '{plural}' must be a non-empty list")
            lists[singular] = values
    kinds = {"model": (str,), "width": (int, float), "resolution": (int,), "num_classes": (int,),
             "output_stride": (int,), "batch": (int,)}
    wanted = {"model": "a string", "width": "a number"}
    combos = [dict(fields)]
    for key, values in lists.items():
        combos = [dict(c, **{key: v}) for c in combos for v in values]
    out = []
    for c in combos:
        for key, value in c.items():
            if value is None and key not in ("model",):
                continue
            if not isinstance(value, kinds[key]) or isinstance(value, bool):
                raise UserError(f"{where}: field '{key}' must be {wanted.get(key, 'an integer')}, not {value!r}")
        if "width" in c and c["width"] is not None:
            c["width"] = float(c["width"])
        try:
            out.append(ModelConfig(**c))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return out
