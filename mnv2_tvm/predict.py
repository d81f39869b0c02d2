"""Latency predictors from multiply-adds, their held-out metrics, and the comparison plots.

This module is the pure-numerical core of the "does MAdds predict latency?" comparison.
It depends on numpy only (matplotlib is imported lazily inside the plotting functions),
so it can be used and tested without TVM or torch.

Data model
----------
* :class:`LayerCost` — one layer of one configuration: its kind, MAdds and the bytes it
  moves (fp32 weights + input activations + output activations).
* :class:`Point` — one measured configuration (model, width multiplier, input resolution)
  with its total MAdds, its layers, and its measured latency in milliseconds.

Predictors (all ``fit(train_points) -> self`` and ``predict(points) -> np.ndarray`` in ms)
------------------------------------------------------------------------------------------
* :class:`NaivePredictor` — ``2 * MAdds / peak FLOP/s``; nothing is fitted.
* :class:`LinearMAddPredictor` — ``a * MAdds + b`` by ordinary least squares.
* :class:`RooflinePredictor` — per layer ``max(MAdds / rate[kind], bytes / bandwidth) + c``
  summed over the layers, plus a constant ``b``; fitted by alternating between assigning
  each layer to its compute or memory bound and solving a (weighted, mildly regularised)
  non-negative least-squares problem (:func:`nnls`, Lawson–Hanson, numpy only).
* :class:`LayerwisePredictor` — per layer ``call + MAdds / rate + bytes / bandwidth``, all three
  per kind, fitted on the measured layer times of the training points (``LayerCost.ms``),
  summed and calibrated as ``a * sum + b``.

Evaluation: :func:`split` (deterministic, stratified on MAdds, extremes kept in train),
:func:`metrics` (r2, MAPE, worst error, share within ±10 %, Spearman), :func:`evaluate`,
:func:`ranking_change` (how tuning reorders configurations).

Plots: :func:`plot_latency_vs_madds`, :func:`plot_predicted_vs_measured`,
:func:`plot_layer_share`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "LAYER_KINDS",
    "ROOFLINE_KINDS",
    "LayerCost",
    "Point",
    "config_label",
    "nnls",
    "rankdata",
    "spearman",
    "NaivePredictor",
    "LinearMAddPredictor",
    "RooflinePredictor",
    "LayerwisePredictor",
    "make_predictors",
    "metrics",
    "evaluate",
    "Split",
    "split",
    "ranking_change",
    "plot_latency_vs_madds",
    "plot_predicted_vs_measured",
    "plot_layer_share",
]

#: Every layer kind a :class:`LayerCost` may have.
LAYER_KINDS: tuple[str, ...] = ("conv", "depthwise", "pointwise", "linear", "other")
#: The kinds that get their own compute rate in :class:`RooflinePredictor`.
#: Layers of kind ``"other"`` (adds, pooling, ...) are modelled as memory-bound only.
ROOFLINE_KINDS: tuple[str, ...] = ("conv", "depthwise", "pointwise", "linear")


# --------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------


@dataclass
class LayerCost:
    """Cost of one layer: ``kind`` in :data:`LAYER_KINDS`, ``bytes`` = fp32 weights +
    input activations + output activations; ``ms`` its measured time when the point was
    profiled (training data for :class:`LayerwisePredictor`; never read when predicting)."""

    name: str
    kind: str
    madds: int
    bytes: int
    ms: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer {self.name!r}: kind {self.kind!r} is not one of {LAYER_KINDS}")
        if self.madds < 0 or self.bytes < 0:
            raise ValueError(f"layer {self.name!r}: madds and bytes must be non-negative")


@dataclass
class Point:
    """One measured configuration; ``latency_ms`` is the measured (e.g. median) latency."""

    model: str
    width: float
    resolution: int
    madds: int
    layers: list[LayerCost] = field(default_factory=list)
    latency_ms: float = float("nan")
    tuned: bool = False

    @property
    def label(self) -> str:
        return config_label(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Point:
        layers = [l if isinstance(l, LayerCost) else LayerCost(**l) for l in d.get("layers", [])]
        return cls(model=d["model"], width=float(d["width"]), resolution=int(d["resolution"]),
                   madds=int(d["madds"]), layers=layers,
                   latency_ms=float(d.get("latency_ms", float("nan"))),
                   tuned=bool(d.get("tuned", False)))


def config_label(point: Point) -> str:
    """A short, unique-per-configuration label, e.g. ``"mobilenet_v2 w=0.75 r=160"``."""
    return f"{point.model} w={point.width:g} r={point.resolution}"


def _config_key(point: Point) -> tuple[str, float, int]:
    return (point.model, round(float(point.width), 6), int(point.resolution))


def _measured(points: Sequence[Point]) -> np.ndarray:
    y = np.array([p.latency_ms for p in points], dtype=float)
    if y.size and not (np.all(np.isfinite(y)) and np.all(y > 0)):
        raise ValueError("every point needs a finite, positive latency_ms")
    return y


# --------------------------------------------------------------------------------------
# Numerical helpers
# --------------------------------------------------------------------------------------


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None,
         tol: float | None = None) -> tuple[np.ndarray, float]:
    """Solve ``min ||A x - b||_2`` subject to ``x >= 0`` (Lawson & Hanson, 1974).

    Returns ``(x, residual_norm)``, like ``scipy.optimize.nnls``.
    """
    A = np.asarray(A, dtype=float)
    b = np.asarray(b, dtype=float).ravel()
    if A.ndim != 2 or A.shape[0] != b.shape[0]:
        raise ValueError(f"nnls: shapes {A.shape} and {b.shape} do not match")
    m, n = A.shape
    x = np.zeros(n)
    if n == 0:
        return x, float(np.linalg.norm(b))
    if tol is None:
        tol = 10.0 * np.finfo(float).eps * max(m, n) * max(1.0, np.abs(A).sum(axis=0).max())
    if max_iter is None:
        max_iter = 30 * n + 30
    passive = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)  # numerically useless candidates, until x changes
    w = A.T @ (b - A @ x)
    iterations = 0
    while True:
        candidates = ~passive & ~blocked & (w > tol)
        if not candidates.any():
            break
        j = int(np.argmax(np.where(candidates, w, -np.inf)))
        passive[j] = True
        first = True
        while True:
            iterations += 1
            if iterations > max_iter:
                return x, float(np.linalg.norm(A @ x - b))
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if np.all(s[passive] > 0):
                break
            if first and s[j] <= 0:
                # Rounding made the entering variable useless; do not let it cycle.
                passive[j] = False
                blocked[j] = True
                s = x
                break
            first = False
            neg = passive & (s <= 0)
            alpha = np.min(x[neg] / (x[neg] - s[neg]))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        if s is not x:
            blocked[:] = False
            x = s
        w = A.T @ (b - A @ x)
    return x, float(np.linalg.norm(A @ x - b))


def _relative_fit(X: np.ndarray, y: np.ndarray, nonnegative: bool = True) -> np.ndarray:
    """``theta`` minimising ``||(X @ theta) / y - 1||`` (relative residuals, so small and large
    rows count alike), with ``theta >= 0`` by :func:`nnls` unless ``nonnegative`` is False; the
    columns are scaled to unit RMS first so that MAdds, bytes and ones are solved on one footing."""
    A = X / y[:, None]
    scale = np.sqrt((A ** 2).mean(axis=0))
    scale[scale == 0] = 1.0
    rhs = np.ones(len(y))
    theta = nnls(A / scale, rhs)[0] if nonnegative else np.linalg.lstsq(A / scale, rhs, rcond=None)[0]
    return theta / scale


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get the average of their ranks (``scipy.stats.rankdata``)."""
    a = np.asarray(values, dtype=float).ravel()
    order = np.argsort(a, kind="mergesort")
    inverse = np.empty(a.size, dtype=np.intp)
    inverse[order] = np.arange(a.size)
    sorted_a = a[order]
    new_group = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    dense = np.cumsum(new_group)[inverse]
    bounds = np.r_[np.nonzero(new_group)[0], a.size]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks); NaN if either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.shape != ry.shape:
        raise ValueError("spearman: x and y differ in length")
    if rx.size < 2:
        return float("nan")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------


class NaivePredictor:
    """``latency = 2 * MAdds / peak`` with ``peak_gflops`` in GFLOP/s; ``fit`` does nothing."""

    name = "naive"

    def __init__(self, peak_gflops: float) -> None:
        if peak_gflops is None or not peak_gflops > 0:
            raise ValueError("NaivePredictor needs a positive peak_gflops (callers skip it when unknown)")
        self.peak_gflops = float(peak_gflops)

    def fit(self, points: Sequence[Point]) -> NaivePredictor:
        return self

    def predict(self, points: Sequence[Point]) -> np.ndarray:
        madds = np.array([p.madds for p in points], dtype=float)
        return 2.0 * madds / (self.peak_gflops * 1e9) * 1e3

    def describe(self) -> dict[str, Any]:
        return {"peak_gflops": self.peak_gflops}


class LinearMAddPredictor:
    """``latency_ms = a * MAdds + b`` by ordinary least squares (``a`` in ms per MAdd)."""

    name = "linear"

    def __init__(self) -> None:
        self.a: float | None = None
        self.b: float | None = None

    def fit(self, points: Sequence[Point]) -> LinearMAddPredictor:
        y = _measured(points)
        m = np.array([p.madds for p in points], dtype=float)
        if np.unique(m).size < 2:
            raise ValueError("LinearMAddPredictor needs at least two distinct MAdds to fit")
        scale = m.max()
        X = np.column_stack([m / scale, np.ones_like(m)])
        (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
        self.a, self.b = float(a / scale), float(b)
        return self

    def predict(self, points: Sequence[Point]) -> np.ndarray:
        if self.a is None:
            raise RuntimeError("LinearMAddPredictor.predict called before fit")
        m = np.array([p.madds for p in points], dtype=float)
        return self.a * m + self.b

    def describe(self) -> dict[str, Any]:
        return {"ms_per_mmadd": None if self.a is None else self.a * 1e6, "intercept_ms": self.b}


class RooflinePredictor:
    """Per-layer roofline with a fixed per-layer overhead, summed over the layers::

        latency_ms = b + sum_layers( max(madds / rate[kind], bytes / bandwidth) + c )

    Layers of kind ``"other"`` only pay ``bytes / bandwidth + c``.

    Fitting alternates between (1) assigning each layer to its compute or memory bound
    under the current parameters and (2) solving the then-linear problem by NNLS, from
    several starting assignments; the parameters with the lowest true (``max``) loss win.
    Residuals are relative (``(pred - measured) / measured``), so small and large
    configurations count alike. A ridge term of weight ``reg`` pulls the parameters
    toward a pure-MAdd model (one shared rate, no memory term, no per-layer overhead),
    which keeps the fit sane with few training points and gives kinds absent from the
    training data the shared rate.

    Fitted attributes: ``rates`` (MAdd/s per kind), ``bandwidth`` (bytes/s),
    ``overhead_ms`` (per layer) and ``intercept_ms``.
    """

    name = "roofline"

    def __init__(self, reg: float = 1e-5, max_iter: int = 50, n_starts: int = 9) -> None:
        self.reg = float(reg)
        self.max_iter = int(max_iter)
        self.n_starts = int(n_starts)
        self.theta: np.ndarray | None = None  # [1/rate per kind (ms/MAdd)..., ms/byte, c, b]
        self.train_loss: float | None = None

    # Parameter vector layout.
    _K = len(ROOFLINE_KINDS)
    _IY, _IC, _IB = _K, _K + 1, _K + 2
    _NP = _K + 3

    @staticmethod
    def _layer_arrays(points: Sequence[Point]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per point: (kind index, madds, bytes) arrays; kind index K means "other"."""
        out = []
        kind_index = {k: i for i, k in enumerate(ROOFLINE_KINDS)}
        for p in points:
            if not p.layers:
                raise ValueError(f"RooflinePredictor needs per-layer costs; {config_label(p)} has none")
            k = np.array([kind_index.get(l.kind, len(ROOFLINE_KINDS)) for l in p.layers], dtype=np.intp)
            m = np.array([l.madds for l in p.layers], dtype=float)
            by = np.array([l.bytes for l in p.layers], dtype=float)
            out.append((k, m, by))
        return out

    def _compute_bound(self, layers, theta: np.ndarray) -> list[np.ndarray]:
        x = np.r_[theta[: self._K], 0.0]  # "other" never compute-bound
        y = theta[self._IY]
        return [(k < self._K) & (m > 0) & (m * x[k] >= by * y) for k, m, by in layers]

    def _design(self, layers, bound: list[np.ndarray]) -> np.ndarray:
        """The linear design matrix (rows: points) for a fixed compute/memory assignment."""
        A = np.zeros((len(layers), self._NP))
        for i, ((k, m, by), cb) in enumerate(zip(layers, bound)):
            A[i, : self._K] = np.bincount(k[cb], weights=m[cb], minlength=self._K + 1)[: self._K]
            A[i, self._IY] = by[~cb].sum()
            A[i, self._IC] = k.size
            A[i, self._IB] = 1.0
        return A

    def _layer_times(self, layers, theta: np.ndarray) -> list[np.ndarray]:
        x = np.r_[theta[: self._K], 0.0]
        return [np.maximum(m * x[k], by * theta[self._IY]) + theta[self._IC] for k, m, by in layers]

    def _predict_layers(self, layers, theta: np.ndarray) -> np.ndarray:
        return np.array([t.sum() + theta[self._IB] for t in self._layer_times(layers, theta)])

    def fit(self, points: Sequence[Point]) -> RooflinePredictor:
        y = _measured(points)
        if len(points) < 2:
            raise ValueError("RooflinePredictor needs at least two training points")
        layers = self._layer_arrays(points)
        n = len(points)
        K, NP = self._K, self._NP

        # Fixed column scales (all-compute for the rates, all-memory for the bandwidth),
        # on the relative (divided-by-measured) rows, RMS over points.
        all_compute = self._design(layers, [(k < K) & (m > 0) for k, m, _ in layers])
        all_memory = self._design(layers, [np.zeros(k.size, dtype=bool) for k, _, _ in layers])
        full = all_compute.copy()
        full[:, self._IY] = all_memory[:, self._IY]
        scale = np.sqrt(((full / y[:, None]) ** 2).mean(axis=0))
        scale[scale == 0] = 1.0

        # Pure-MAdd anchor: latency ≈ a * sum(layer madds of the rated kinds) + b, a, b >= 0.
        total = all_compute[:, :K].sum(axis=1)
        a0, b0 = _relative_fit(np.column_stack([total, np.ones(n)]), y)
        theta0 = np.zeros(NP)
        theta0[:K] = a0
        theta0[self._IB] = b0

        lam = math.sqrt(self.reg)
        reg_rows = lam * np.eye(NP)
        reg_rhs = lam * theta0 * scale

        def objective(theta: np.ndarray) -> float:
            r = self._predict_layers(layers, theta) / y - 1.0
            return float((r ** 2).mean() + self.reg * (((theta - theta0) * scale) ** 2).sum())

        def solve(bound: list[np.ndarray]) -> np.ndarray:
            A = self._design(layers, bound) / y[:, None] / scale / math.sqrt(n)
            rhs = np.ones(n) / math.sqrt(n)
            z, _ = nnls(np.vstack([A, reg_rows]), np.r_[rhs, reg_rhs])
            return z / scale

        # A layer is compute-bound iff its arithmetic intensity (MAdds per byte) reaches
        # its kind's ridge point y / x_kind; "other" layers (ridge inf) never are.
        intensity = [np.where(by > 0, m / np.where(by > 0, by, 1.0), np.inf) for _, m, by in layers]

        def bound_from_ridge(ridge: np.ndarray) -> list[np.ndarray]:
            return [(m > 0) & (it >= ridge[k]) for (k, m, _), it in zip(layers, intensity)]

        def ridge_of(theta: np.ndarray) -> np.ndarray:
            x, yb = theta[:K], theta[self._IY]
            safe = np.where(x > 0, x, 1.0)
            ridge = np.where(x > 0, yb / safe, np.inf if yb > 0 else 0.0)
            return np.r_[ridge, np.inf]

        best = {"theta": theta0, "loss": objective(theta0)}
        seen: set[bytes] = set()

        def descend(bound: list[np.ndarray]) -> bool:
            """Alternate assignment <-> NNLS from ``bound``; True if the best improved."""
            improved = False
            for _ in range(self.max_iter):
                key = np.packbits(np.concatenate(bound)).tobytes()
                if key in seen:
                    break
                seen.add(key)
                theta = solve(bound)
                loss = objective(theta)
                if loss < best["loss"] * (1.0 - 1e-12):
                    best["theta"], best["loss"], improved = theta, loss, True
                bound = self._compute_bound(layers, theta)
            return improved

        # Global starts: all compute-bound, all memory-bound, and one shared ridge point at
        # quantiles of the training layers' intensities.
        all_int = np.concatenate(intensity)
        all_int = all_int[np.isfinite(all_int)]
        shared = np.quantile(all_int, np.linspace(0.0, 1.0, self.n_starts)) if all_int.size else []
        descend(bound_from_ridge(np.r_[np.zeros(K), np.inf]))
        for t in shared:
            descend(bound_from_ridge(np.r_[np.full(K, t), np.inf]))
        descend(bound_from_ridge(np.full(K + 1, np.inf)))

        # Coordinate search over the per-kind ridge points around the best fit so far
        # (the alternation alone can stall in a self-consistent but poor assignment).
        candidates = []
        for kind in range(K):
            vals = np.concatenate([it[k == kind] for (k, _, _), it in zip(layers, intensity)])
            vals = np.unique(vals[np.isfinite(vals)])
            if vals.size > 2 * self.n_starts:
                vals = np.unique(np.quantile(vals, np.linspace(0.0, 1.0, 2 * self.n_starts)))
            candidates.append(np.r_[0.0, vals, np.inf])
        for _sweep in range(4):
            improved = False
            for kind in range(K):
                for t in candidates[kind]:
                    ridge = ridge_of(best["theta"])
                    ridge[kind] = t
                    improved |= descend(bound_from_ridge(ridge))
            if not improved:
                break
        best_theta, best_loss = best["theta"], best["loss"]
        self.theta, self.train_loss = best_theta, best_loss
        return self

    def _check(self) -> np.ndarray:
        if self.theta is None:
            raise RuntimeError("RooflinePredictor used before fit")
        return self.theta

    def predict(self, points: Sequence[Point]) -> np.ndarray:
        return self._predict_layers(self._layer_arrays(points), self._check())

    def layer_times(self, point: Point) -> np.ndarray:
        """Predicted per-layer times (ms, overhead included, intercept excluded)."""
        return self._layer_times(self._layer_arrays([point]), self._check())[0]

    def bounds(self, point: Point) -> list[str]:
        """``"compute"`` or ``"memory"`` for each layer of ``point`` under the fitted model."""
        cb = self._compute_bound(self._layer_arrays([point]), self._check())[0]
        return ["compute" if c else "memory" for c in cb]

    @property
    def rates(self) -> dict[str, float]:
        """Fitted compute rate per kind in MAdd/s (``inf`` if the kind costs nothing)."""
        theta = self._check()
        return {k: (1e3 / theta[i] if theta[i] > 0 else float("inf")) for i, k in enumerate(ROOFLINE_KINDS)}

    @property
    def bandwidth(self) -> float:
        """Fitted bandwidth in bytes/s (``inf`` if memory traffic costs nothing)."""
        y = self._check()[self._IY]
        return 1e3 / y if y > 0 else float("inf")

    @property
    def overhead_ms(self) -> float:
        return float(self._check()[self._IC])

    @property
    def intercept_ms(self) -> float:
        return float(self._check()[self._IB])

    def describe(self) -> dict[str, Any]:
        if self.theta is None:
            return {}
        return {"gmadds_per_s": {k: v / 1e9 for k, v in self.rates.items()},
                "bandwidth_gb_per_s": self.bandwidth / 1e9,
                "overhead_us_per_layer": self.overhead_ms * 1e3,
                "intercept_ms": self.intercept_ms}


class LayerwisePredictor:
    """Per-layer cost laws fitted on measured layer times, summed per configuration::

        layer_ms   = call[kind] + MAdds / rate[kind] + bytes / bandwidth[kind]
        latency_ms = a · sum_layers(layer_ms) + b

    The roofline above sees one number per training configuration (its end-to-end latency);
    this model learns from every profiled layer of them (~50 a MobileNetV2, so ~750 layers from
    15 configurations), and each kind gets its own compute rate, memory bandwidth and fixed cost
    per kernel call: depthwise layers are bound by their bytes, pointwise by their MAdds, and the
    small layers of small inputs by the call itself. The terms add rather than take the larger
    (a tuned kernel overlaps its loads and FMAs only in part); ``a`` and ``b`` carry what
    per-layer times leave out (kernels of no conv/linear layer, VM dispatch), ``b`` of either sign.

    Fitted by non-negative least squares on relative residuals per kind (so small and large
    layers count alike); a kind with fewer than six timed layers gets the law fitted on all
    kinds pooled. ``fit`` raises ValueError when the training points have no measured layer
    times (measured without a profile); predicting reads only MAdds and bytes.
    """

    name = "layerwise"

    def __init__(self) -> None:
        self.laws: dict[str, np.ndarray] | None = None  # kind → [ms per call, ms per MAdd, ms per byte]
        self.pooled: np.ndarray | None = None
        self.a = self.b = 0.0
        self.samples: dict[str, int] = {}

    @staticmethod
    def _features(layers: Sequence[LayerCost]) -> np.ndarray:
        return np.array([[1.0, float(l.madds), float(l.bytes)] for l in layers]).reshape(-1, 3)

    @classmethod
    def _solve(cls, layers: Sequence[LayerCost]) -> np.ndarray:
        return _relative_fit(cls._features(layers), np.array([l.ms for l in layers], dtype=float))

    def fit(self, points: Sequence[Point]) -> LayerwisePredictor:
        y = _measured(points)
        timed = [l for p in points for l in p.layers if l.ms is not None and l.ms > 0]
        if not timed or len(points) < 2:
            raise ValueError("LayerwisePredictor needs measured layer times of at least two configurations "
                             "(points measured with a per-kernel profile)")
        by_kind: dict[str, list[LayerCost]] = {}
        for l in timed:
            by_kind.setdefault(l.kind, []).append(l)
        self.samples = {k: len(v) for k, v in by_kind.items()}
        self.laws = {k: self._solve(v) for k, v in by_kind.items() if len(v) >= 6}
        self.pooled = self._solve(timed)
        s = self._layer_sums(points)
        a, b = _relative_fit(np.column_stack([s, np.ones_like(s)]), y, nonnegative=False)
        self.a, self.b = float(a), float(b)
        return self

    def layer_times(self, point: Point) -> np.ndarray:
        """Predicted time of each layer of ``point`` in ms (before the ``a``, ``b`` calibration)."""
        if self.laws is None or self.pooled is None:
            raise RuntimeError("LayerwisePredictor used before fit")
        X = self._features(point.layers)
        return np.array([x @ self.laws.get(l.kind, self.pooled) for x, l in zip(X, point.layers)])

    def _layer_sums(self, points: Sequence[Point]) -> np.ndarray:
        return np.array([self.layer_times(p).sum() for p in points])

    def predict(self, points: Sequence[Point]) -> np.ndarray:
        return self.a * self._layer_sums(points) + self.b

    def describe(self) -> dict[str, Any]:
        if self.laws is None:
            return {}

        def law(theta: np.ndarray) -> dict[str, float | None]:
            call, per_madd, per_byte = (float(v) for v in theta)
            return {"us_per_call": call * 1e3, "gmadds_per_s": 1e-6 / per_madd if per_madd > 0 else None,
                    "gb_per_s": 1e-6 / per_byte if per_byte > 0 else None}

        return {"laws": {k: law(v) for k, v in self.laws.items()}, "layers_fitted": dict(self.samples),
                "scale_a": self.a, "intercept_ms": self.b}


def make_predictors(peak_gflops: float | None = None, layer_times: bool = False) -> dict[str, Any]:
    """The standard set of predictors by name; ``naive`` only when the peak is known,
    ``layerwise`` only when the points carry measured layer times."""
    out: dict[str, Any] = {}
    if peak_gflops is not None:
        out["naive"] = NaivePredictor(peak_gflops)
    out["linear"] = LinearMAddPredictor()
    out["roofline"] = RooflinePredictor()
    if layer_times:
        out["layerwise"] = LayerwisePredictor()
    return out


# --------------------------------------------------------------------------------------
# Metrics, split, evaluation
# --------------------------------------------------------------------------------------


def metrics(pred: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Accuracy of ``pred`` against ``measured`` (use held-out points only).

    ``r2`` (coefficient of determination; NaN if ``measured`` is constant), ``mape`` and
    ``worst`` in percent of the measured value, ``within10`` the share (0..1) of points
    within ±10 %, ``spearman`` the rank correlation (NaN if either side is constant).
    """
    p = np.asarray(pred, dtype=float).ravel()
    m = np.asarray(measured, dtype=float).ravel()
    if p.shape != m.shape:
        raise ValueError(f"metrics: {p.size} predictions for {m.size} measurements")
    if m.size == 0:
        raise ValueError("metrics: no points")
    if not np.all(m > 0):
        raise ValueError("metrics: measured latencies must be positive")
    rel = np.abs(p - m) / m
    ss_tot = float(((m - m.mean()) ** 2).sum())
    ss_res = float(((p - m) ** 2).sum())
    return {
        "n": int(m.size),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "mape": float(rel.mean() * 100.0),
        "worst": float(rel.max() * 100.0),
        "within10": float(np.mean(rel <= 0.10 + 1e-12)),
        "spearman": spearman(p, m),
    }


class Split(NamedTuple):
    """``(train, test)``; unpacks like a tuple, and reports its configurations."""

    train: list[Point]
    test: list[Point]

    @property
    def train_labels(self) -> list[str]:
        return [config_label(p) for p in self.train]

    @property
    def test_labels(self) -> list[str]:
        return [config_label(p) for p in self.test]

    def report(self) -> dict[str, list[str]]:
        return {"train": self.train_labels, "test": self.test_labels}


def split(points: Sequence[Point], test_fraction: float = 0.4, seed: int = 0) -> Split:
    """Deterministic train/test split of configurations, stratified on MAdds, per model.

    Within each model the configurations are sorted by MAdds; the smallest and the largest
    always go to train (held-out prediction is interpolation). The interior is cut into
    as many consecutive MAdds strata as there are test configurations and one per stratum,
    chosen with ``seed``, is held out. Points of the same configuration (e.g. its tuned and
    untuned measurements) land on the same side. The result does not depend on the input
    order. Models with fewer than three configurations are train-only.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    if len({(_config_key(p), p.tuned) for p in points}) != len(points):
        raise ValueError("split: the same configuration (and tuned flag) appears twice")
    rng = np.random.default_rng(seed)
    configs: dict[str, dict[tuple[str, float, int], int]] = {}
    for p in points:
        group = configs.setdefault(p.model, {})
        key = _config_key(p)
        group[key] = min(group.get(key, p.madds), p.madds)
    held: set[tuple[str, float, int]] = set()
    for model in sorted(configs):
        ordered = sorted(configs[model], key=lambda k: (configs[model][k], k))
        n = len(ordered)
        n_test = min(int(round(test_fraction * n)), n - 2) if n >= 3 else 0
        if n_test > 0:
            for stratum in np.array_split(np.arange(1, n - 1), n_test):
                held.add(ordered[int(rng.choice(stratum))])
    order = sorted(points, key=lambda p: (p.model, p.madds, _config_key(p), p.tuned))
    return Split([p for p in order if _config_key(p) not in held],
                 [p for p in order if _config_key(p) in held])


def evaluate(predictors: Mapping[str, Any], train: Sequence[Point],
             test: Sequence[Point]) -> dict[str, dict[str, Any]]:
    """Fit each predictor (``None`` entries are skipped) on ``train``; metrics on ``test``.

    Returns ``{name: {"metrics": ..., "predicted_ms": [...], "params": ...}}``.
    """
    measured = _measured(test)
    out: dict[str, dict[str, Any]] = {}
    for name, predictor in predictors.items():
        if predictor is None:
            continue
        predictor.fit(train)
        pred = np.asarray(predictor.predict(test), dtype=float)
        out[name] = {"metrics": metrics(pred, measured), "predicted_ms": pred.tolist(),
                     "params": predictor.describe() if hasattr(predictor, "describe") else {}}
    return out


def ranking_change(untuned_points: Sequence[Point], tuned_points: Sequence[Point]) -> dict[str, Any]:
    """How tuning reorders configurations by latency.

    Configurations are matched on (model, width, resolution); those present on only one
    side are ignored (their labels are reported). Returns ``n``, ``spearman`` between the
    untuned and tuned latencies, ``flipped_pairs`` (pairs strictly ordered one way before
    and the other way after tuning), ``total_pairs`` and the ``flipped`` label pairs.
    """
    untuned = {_config_key(p): p for p in untuned_points}
    tuned = {_config_key(p): p for p in tuned_points}
    if len(untuned) != len(untuned_points) or len(tuned) != len(tuned_points):
        raise ValueError("ranking_change: a configuration appears twice on one side")
    common = sorted(set(untuned) & set(tuned))
    if len(common) < 2:
        raise ValueError("ranking_change: fewer than two configurations measured both untuned and tuned")
    u = _measured([untuned[k] for k in common])
    t = _measured([tuned[k] for k in common])
    du = np.sign(u[:, None] - u[None, :])
    dt = np.sign(t[:, None] - t[None, :])
    i, j = np.nonzero(np.triu(du * dt < 0, k=1))
    labels = [config_label(tuned[k]) for k in common]
    return {
        "n": len(common),
        "spearman": spearman(u, t),
        "flipped_pairs": int(i.size),
        "total_pairs": len(common) * (len(common) - 1) // 2,
        "flipped": [(labels[a], labels[b]) for a, b in zip(i, j)],
        "unmatched": sorted(config_label(d[k]) for d in (untuned, tuned)
                            for k in set(d) - set(common)),
    }


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_latency_vs_madds(points: Sequence[Point], path: str | Path, title: str | None = None) -> Path:
    """Scatter of latency against MAdds, tuned and untuned, each with its linear fit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups = [(True, "tuned", "tab:blue", "o"), (False, "untuned", "tab:orange", "s")]
    for flag, name, color, marker in groups:
        pts = [p for p in points if p.tuned == flag]
        if not pts:
            continue
        mm = np.array([p.madds for p in pts], dtype=float) / 1e6
        lat = np.array([p.latency_ms for p in pts], dtype=float)
        ax.scatter(mm, lat, color=color, marker=marker, s=36, alpha=0.85, label=f"{name} ({len(pts)})",
                   zorder=3)
        if np.unique(mm).size >= 2:
            fit = LinearMAddPredictor().fit(pts)
            xs = np.geomspace(mm.min() / 1.1, mm.max() * 1.1, 60)
            ys = fit.a * 1e6 * xs + fit.b
            r2 = metrics(fit.predict(pts), lat)["r2"] if len(pts) > 2 else float("nan")
            ax.plot(xs[ys > 0], ys[ys > 0], color=color, lw=1.5, ls="--",
                    label=f"{name} fit: {fit.a * 1e6:.4g} ms/MMAdd {fit.b:+.3g} ms (R²={r2:.3f})")
    ax.set_xlabel("Multiply-adds (millions)", fontsize=11)
    ax.set_ylabel("Latency (ms)", fontsize=11)
    ax.set_title(title or "Latency vs multiply-adds", fontsize=12)
    # Log axes: tuned and untuned differ 4-27x and the grid spans 50x in MAdds; on linear axes
    # the tuned points of the small configurations sit on the floor.
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    return _save(fig, path)


def plot_predicted_vs_measured(predictions: Mapping[str, Sequence[float] | np.ndarray],
                               measured: Sequence[float] | np.ndarray, path: str | Path,
                               title: str | None = None) -> Path:
    """One panel per predictor: predicted against measured (held-out), with a ±10 % band."""
    plt = _pyplot()
    m = np.asarray(measured, dtype=float)
    names = list(predictions)
    if not names:
        raise ValueError("plot_predicted_vs_measured: no predictions")
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.6), squeeze=False)
    all_pred = np.concatenate([np.asarray(predictions[k], dtype=float) for k in names])
    finite = np.concatenate([m, all_pred])
    finite = finite[np.isfinite(finite)]
    hi = float(finite.max()) * 1.08 if finite.size else 1.0
    xs = np.linspace(0.0, hi, 50)
    for ax, name in zip(axes[0], names):
        p = np.asarray(predictions[name], dtype=float)
        met = metrics(p, m)
        ax.fill_between(xs, 0.9 * xs, 1.1 * xs, color="tab:green", alpha=0.15, label="±10 %")
        ax.plot(xs, xs, color="tab:green", lw=1)
        ax.scatter(m, p, s=30, color="tab:blue", zorder=3)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("Measured latency (ms)", fontsize=10)
        ax.set_ylabel("Predicted latency (ms)", fontsize=10)
        ax.set_title(f"{name}\nMAPE {met['mape']:.1f} %, worst {met['worst']:.1f} %, "
                     f"R² {met['r2']:.3f}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, loc="upper left")
    fig.suptitle(title or f"Predicted vs measured on {m.size} held-out configurations", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_share(layers: Sequence[LayerCost], layer_times_ms: Sequence[float] | np.ndarray,
                     path: str | Path, title: str | None = None,
                     time_label: str = "share of measured time") -> Path:
    """Per-layer share of time next to its share of MAdds, for one configuration.

    ``layer_times_ms`` are per-layer times in the order of ``layers`` (measured, or e.g.
    :meth:`RooflinePredictor.layer_times` with ``time_label`` changed accordingly).
    """
    plt = _pyplot()
    t = np.asarray(layer_times_ms, dtype=float)
    if t.size != len(layers):
        raise ValueError(f"plot_layer_share: {t.size} times for {len(layers)} layers")
    madds = np.array([l.madds for l in layers], dtype=float)
    t_share = 100.0 * t / t.sum() if t.sum() > 0 else np.zeros_like(t)
    m_share = 100.0 * madds / madds.sum() if madds.sum() > 0 else np.zeros_like(madds)
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * len(layers) + 2.0), 5.5))
    ax.bar(x - 0.2, m_share, width=0.4, color="tab:gray", label="share of MAdds")
    ax.bar(x + 0.2, t_share, width=0.4, color="tab:red", label=time_label)
    kind_colors = {"conv": "black", "depthwise": "tab:purple", "pointwise": "tab:blue",
                   "linear": "tab:green", "other": "tab:brown"}
    ax.set_xticks(x)
    ax.set_xticklabels([l.name for l in layers], rotation=90, fontsize=7)
    for tick, layer in zip(ax.get_xticklabels(), layers):
        tick.set_color(kind_colors.get(layer.kind, "black"))
    ax.set_xlim(-0.7, len(layers) - 0.3)
    ax.set_ylabel("Share of total (%)", fontsize=11)
    ax.set_title(title or "Per-layer time share vs MAdd share", fontsize=12)
    ax.grid(True, axis="y", alpha=0.3)
    present = [k for k in LAYER_KINDS if any(l.kind == k for l in layers)]
    ax.legend(fontsize=9, loc="upper right", title_fontsize=8,
              title="tick colour: " + ", ".join(f"{k}={kind_colors[k].replace('tab:', '')}" for k in present))
    return _save(fig, path)
