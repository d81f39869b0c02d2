"""Grid runs: measure configurations untuned and tuned, fit MAdd predictors, write the report.

One call, :func:`run_compare`, does the whole job for one target:

1. the grid (:func:`default_grid` or :func:`load_grid`, :mod:`.grid`) is counted (MAdds, bytes
   per layer); a configuration that cannot be built stops the run before anything is measured;
2. with ``tune_trials_per_config > 0`` every configuration is tuned into the records first
   (``tuning.tune`` only runs what the records lack), so all tuned points see one records state;
3. every configuration is compiled untuned (an empty records folder) and tuned (the target's
   records) and measured by a :class:`Measurer` (:mod:`.measure`); each finished point is
   appended to ``REPORT_DIR/points.jsonl`` (flushed and fsynced, :mod:`.store`), which is what
   makes a run resumable; a tuned point keeps the digest of the records of its own kernels and is
   measured again only when those change (tuning other configurations into the shared database
   leaves it valid);
4. predictors from :mod:`mnv2_tvm.predict` are fitted on a split of the MobileNetV2 points and
   scored on the held-out rest; the report (``results.json``, ``results.csv``, ``summary.md`` and
   PNG plots, :mod:`.report`) is written at the end, each file atomically, marked incomplete when
   points are missing.

Per-kernel times and their mapping to the model's layers are in :mod:`.profile`; the run itself
in :mod:`.run`. Importing this package imports neither TVM nor torch.
"""

from __future__ import annotations

from .grid import DEFAULT_RESOLUTIONS, DEFAULT_WIDTHS, GRIDS, REFERENCE_CONFIG, default_grid, grid_configs, \
    load_grid, quick_grid
from .measure import BoardMeasurer, HostMeasurer, Measurement, Measurer, ModelledMeasurer
from .profile import KernelTime, LayerMap, LayerTime, map_kernels, profile_kernels, same_module
from .report import FORMAT, PLOT_LATENCY, PLOT_LAYERS, PLOT_PREDICTED, REPORT_FILES, RESULTS_CSV, RESULTS_JSON, \
    SUMMARY, CompareResult
from .run import DEFAULT_PASSES, WORK_DIR, run_compare
from .store import POINTS_FILE, VARIANTS, PointStore

__all__ = [
    "DEFAULT_PASSES",
    "DEFAULT_RESOLUTIONS",
    "DEFAULT_WIDTHS",
    "FORMAT",
    "GRIDS",
    "PLOT_LATENCY",
    "PLOT_LAYERS",
    "PLOT_PREDICTED",
    "POINTS_FILE",
    "REFERENCE_CONFIG",
    "REPORT_FILES",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "SUMMARY",
    "VARIANTS",
    "WORK_DIR",
    "BoardMeasurer",
    "CompareResult",
    "HostMeasurer",
    "KernelTime",
    "LayerMap",
    "LayerTime",
    "Measurement",
    "Measurer",
    "ModelledMeasurer",
    "PointStore",
    "default_grid",
    "grid_configs",
    "load_grid",
    "map_kernels",
    "profile_kernels",
    "quick_grid",
    "run_compare",
    "same_module",
]
