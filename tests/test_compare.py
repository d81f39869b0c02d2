"""compare: grid files, kernel → layer mapping, resumable grid runs and the report, on tiny real models.

The predictors' fitting and metrics are tested on synthetic data in test_predict.py; here every
measured number comes from a real compiled MobileNetV2 on this host (tiny widths/resolutions).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mnv2_tvm import compare, targets
from mnv2_tvm.compare.profile import board_kernels
from mnv2_tvm.compare.run import _lock_report_dir
from mnv2_tvm.compare.store import records_fingerprint
from mnv2_tvm.compare import HostMeasurer, KernelTime, load_grid, map_kernels, run_compare
from mnv2_tvm.errors import UserError
from mnv2_tvm.models import ModelConfig

# Three tiny MobileNetV2 configs: the fewest that let predictors be fitted on two and scored on one.
TINY_GRID = [{"model": "mobilenet_v2", "width": 0.35, "resolutions": [32, 64, 96]}]
TINY_LABELS = ["mobilenet_v2-0.35-32", "mobilenet_v2-0.35-64", "mobilenet_v2-0.35-96"]


# --------------------------------------------------------------------------------------
# Grid files
# --------------------------------------------------------------------------------------


def test_default_grid_is_the_paper_grid_plus_detector_and_segmenter():
    grid = compare.default_grid()
    mnv2 = {(c.width, c.resolution) for c in grid if c.model == "mobilenet_v2"}
    assert mnv2 == {(w, r) for w in (0.35, 0.5, 0.75, 1.0, 1.4) for r in (96, 128, 160, 192, 224)}
    others = [c for c in grid if c.model != "mobilenet_v2"]
    assert [(c.model, c.resolution) for c in others] == [("ssdlite", 320), ("deeplabv3", 513)]
    assert len(grid) == 27 and compare.REFERENCE_CONFIG in grid


def test_grid_from_json_and_toml_expands_lists_and_drops_duplicates(tmp_path):
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"configs": [
        {"model": "mobilenet_v2", "widths": [0.35, 1], "resolution": 96},
        {"model": "mobilenet_v2", "width": 0.35, "resolution": 96},  # a repeat of the first
        {"model": "deeplabv3", "width": 0.5, "resolution": 129, "output_stride": 8},
    ]}))
    t = tmp_path / "g.toml"
    t.write_text(textwrap.dedent("""\
        [[configs]]
        model = "mobilenet_v2"
        widths = [0.35, 1.0]
        resolution = 96

        [[configs]]
        model = "deeplabv3"
        width = 0.5
        resolution = 129
        output_stride = 8
    """))
    expected = [ModelConfig("mobilenet_v2", 0.35, 96), ModelConfig("mobilenet_v2", 1.0, 96),
                ModelConfig("deeplabv3", 0.5, 129, output_stride=8)]
    assert load_grid(j) == expected
    assert load_grid(t) == expected
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(TINY_GRID))
    assert [c.label for c in load_grid(plain)] == TINY_LABELS


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "does not exist"),
    ("empty.json", "", "is empty"),
    ("blank.toml", "  \n", "is empty"),
    ("nothing.json", "[]", "lists no configurations"),
    ("nothing.toml", "configs = []", "lists no configurations"),
    ("broken.json", '[{"model": "mobilenet_v2",}]', r"not valid JSON: .* line 1, column"),
    ("broken.toml", "[[configs]\nmodel = 1", "not valid TOML"),
    ("grid.yaml", "- model: mobilenet_v2", r"must end in \.json or \.toml"),
    ("scalar.json", "3", "must hold a list of configurations, not a int"),
    ("keys.json", '{"grid": []}', "unexpected keys: grid"),
    ("entry.json", '["mobilenet_v2"]', "entry 1: expected a table of config fields, not str"),
    ("typo.json", '[{"model": "mobilenet_v2", "resolutoin": 96}]', r"entry 1: unknown field\(s\) resolutoin"),
    ("nomodel.json", '[{"width": 1.0}]', "entry 1: missing field 'model'"),
    ("width.json", '[{"model": "mobilenet_v2"}, {"model": "mobilenet_v2", "width": 4.5}]',
     "entry 2: width 4.5 is invalid"),
    ("res.toml", '[[configs]]\nmodel = "mobilenet_v2"\nresolutions = [96, 100]',
     "entry 1: resolution 100 is invalid for mobilenet_v2"),
    ("classes.json", '[{"model": "ssdlite", "num_classes": 50}]', "entry 1: ssdlite supports 80, 81, 91 classes"),
    ("type.json", '[{"model": "mobilenet_v2", "width": "1.0"}]', "entry 1: field 'width' must be a number"),
    ("both.json", '[{"model": "mobilenet_v2", "width": 1.0, "widths": [0.5]}]', "either 'width' or 'widths'"),
    ("emptylist.json", '[{"model": "mobilenet_v2", "widths": []}]', "'widths' must be a non-empty list"),
])
def test_bad_grid_files_are_refused_with_the_reason(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_grid(path)


def test_compare_refuses_a_target_this_host_cannot_run_before_compiling(tmp_path):
    with pytest.raises(UserError, match="not this machine's CPU"):
        run_compare(targets.load("rpi4b"), tmp_path / "r", grid=_grid_file(tmp_path), progress=False)
    assert not (tmp_path / "r" / compare.POINTS_FILE).exists()


# --------------------------------------------------------------------------------------
# Kernels → layers
# --------------------------------------------------------------------------------------


def test_profiled_kernels_map_one_to_one_onto_the_conv_and_linear_layers(host_bundles):
    from mnv2_tvm.bundle import Runner, reference
    from mnv2_tvm.madds import count

    path = host_bundles("mobilenet_v2")  # 0.35/96, untuned
    runner = Runner(path)
    cfg = ModelConfig.from_dict(runner.manifest["config"])
    x, _ = reference(path)
    kernels = compare.profile_kernels(runner.vm, runner.device, runner.check_input(x), runs=3)
    layers = count(cfg).layers
    lmap = map_kernels(kernels, layers)

    assert lmap.complete, (lmap.unmatched_layers, lmap.unmatched_kernels)
    matched = [r for r in lmap.rows if r.kind != "other"]
    assert sorted(r.layer for r in matched) == sorted(l.name for l in layers)
    by_name = {l.name: l for l in layers}
    for r in matched:
        # The kernel kind agrees with the layer kind, and its argument shapes imply the layer's MAdds.
        assert ("matmul" in r.kernel) == (r.kind == "linear") and ("conv2d" in r.kernel) == (r.kind != "linear")
        assert r.output_shape == by_name[r.layer].output_shape and r.ms is not None and r.ms > 0
    assert {k.madds for k in kernels if "conv2d" in k.name} <= {l.madds for l in layers}
    # Global pooling, no MAdds (TVM may number the kernel's name: mean, mean1, ...).
    assert [r.layer.rstrip("0123456789") for r in lmap.rows if r.kind == "other"] == ["mean"]
    # How the kernel times add up against the whole run is a measurement (bench --profile), not a test:
    # on a shared machine the two timings are taken at different moments.


def test_mapping_follows_shapes_and_madds_not_the_order_of_parallel_branches():
    from mnv2_tvm.madds import LayerCount

    # Two heads with one output shape but different MAdds, executed in the opposite order.
    layers = [LayerCount("stem", "conv", (1, 8, 4, 4), 1000, 10, 100),
              LayerCount("head.cls", "pointwise", (1, 6, 4, 4), 768, 48, 200),
              LayerCount("head.box", "conv", (1, 6, 4, 4), 6912, 432, 300)]
    kernels = [KernelTime("fused_conv2d_add", (1, 8, 4, 4), 120, 1.0, 1000),
               KernelTime("fused_conv2d2_add", (1, 6, 4, 4), 320, 3.0, 6912),
               KernelTime("concatenate", (1, 12, 4, 4), 400, 0.5),
               KernelTime("fused_conv2d1_add", (1, 6, 4, 4), 220, 2.0, 768)]
    lmap = map_kernels(kernels, layers)
    assert [(r.layer, r.ms) for r in lmap.rows] == [("stem", 1.0), ("head.box", 3.0), ("concatenate", 0.5),
                                                    ("head.cls", 2.0)]
    assert lmap.rows[2].kind == "other" and lmap.rows[2].madds == 0 and lmap.rows[2].bytes == 400
    # A layer no kernel computes is reported, not silently dropped.
    lmap = map_kernels(kernels[:2], layers)
    assert lmap.unmatched_layers == ["head.cls"] and lmap.rows[-1].ms is None and not lmap.complete


# --------------------------------------------------------------------------------------
# Grid runs: interrupted, resumed, reported
# --------------------------------------------------------------------------------------


class CountingMeasurer:
    """The host measurer, counting which configurations it really measured (``measured``, in
    call order) and which of those calls also profiled the kernels (``profiled``)."""

    def __init__(self, emulated: bool = False) -> None:
        self.inner = HostMeasurer(repeat=3, min_repeat_ms=20, profile_budget_ms=300)
        self.name = self.inner.name
        self.emulated = emulated
        self.measured: list[str] = []
        self.profiled: list[str] = []

    def measure(self, bundle_dir, cfg, *, profile=True):
        self.measured.append(cfg.label)
        if profile:
            self.profiled.append(cfg.label)
        return self.inner.measure(bundle_dir, cfg, profile=profile)


def _grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(TINY_GRID))
    return path


def _points(report_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (report_dir / compare.POINTS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run stopped with Ctrl-C after its first point, then resumed in this process."""
    root = tmp_path_factory.mktemp("compare")
    out, records = root / "report", root / "no-records"
    records.mkdir()
    grid = _grid_file(root)
    script = textwrap.dedent(f"""\
        from pathlib import Path
        from mnv2_tvm import targets
        from mnv2_tvm.compare import HostMeasurer, run_compare
        run_compare(targets.load("host"), Path({str(out)!r}), grid={str(grid)!r}, records_dir=Path({str(records)!r}),
                    measurer=HostMeasurer(repeat=3, min_repeat_ms=20, profile_budget_ms=300))
    """)
    log = root / "first-run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        points = out / compare.POINTS_FILE
        while not (points.exists() and points.read_text().count("\n") >= 1):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no point after 240 s:\n" + log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = {
        "points": _points(out),
        "log": log.read_text(),
        "results": json.loads((out / compare.RESULTS_JSON).read_text()),
        "summary": (out / compare.SUMMARY).read_text(),
    }
    measurer = CountingMeasurer()
    result = run_compare(targets.load("host"), out, grid=grid, records_dir=records, measurer=measurer, progress=True,
                         passes=3)
    return {"first": first, "result": result, "measurer": measurer, "out": out, "grid": grid, "records": records}


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_points_and_says_it_is_incomplete(resumed_run):
    first = resumed_run["first"]
    assert [p["key"] for p in first["points"]] == ["mobilenet_v2-0.35-32|untuned"]
    assert "interrupted" in first["log"]
    assert first["results"]["complete"] is False and first["results"]["interrupted"] is True
    assert "**INCOMPLETE** (interrupted;" in first["summary"]
    assert "mobilenet_v2-0.35-96 untuned: interrupted before it was measured" in first["summary"]


@pytest.mark.slow
def test_a_resumed_run_measures_only_the_missing_points(resumed_run):
    result, measurer = resumed_run["result"], resumed_run["measurer"]
    assert measurer.measured[:2] == TINY_LABELS[1:]  # the first pass: only the points not measured yet
    assert result.reused == 1 and result.measured == 2
    points = _points(resumed_run["out"])
    assert points[0] == resumed_run["first"]["points"][0]  # untouched, not measured again
    assert [p["label"] for p in points[:3]] == TINY_LABELS
    assert not (resumed_run["out"] / compare.WORK_DIR).exists()  # no bundles left behind


@pytest.mark.slow
def test_every_point_is_timed_in_passes_spread_over_the_run_and_keeps_its_fastest(resumed_run):
    measurer = resumed_run["measurer"]
    # Pass 2 walks the grid backwards, pass 3 forwards (untuned only: the records are empty);
    # the point measured before the interrupt gets its later passes like the others, and the
    # kernels are profiled in the last pass, away from the compiles.
    assert measurer.measured[2:] == TINY_LABELS[::-1] + TINY_LABELS
    assert measurer.profiled == TINY_LABELS
    lines = _points(resumed_run["out"])
    assert len(lines) == 3 + 6  # each pass appends the point again; the last line of a key wins
    latest = {p["key"]: p for p in lines}
    for p in latest.values():
        assert len(p["passes_ms"]) == 3 and all(x > 0 for x in p["passes_ms"])
        assert p["latency_ms"] == min(p["passes_ms"]) and p["passes_ms"][0] == statistics.median(p["times_ms"])
        assert "layer_map" in p  # the first pass's profile is kept
    report = json.loads((resumed_run["out"] / compare.RESULTS_JSON).read_text())
    spread = report["pass_spread"]
    assert spread["points"] == 3 and 0 <= spread["median"] <= spread["max"]
    csv_rows = (resumed_run["out"] / compare.RESULTS_CSV).read_text().splitlines()
    assert "passes_ms" in csv_rows[0].split(",")
    assert "fastest of each point's timing passes" in (resumed_run["out"] / compare.SUMMARY).read_text()


@pytest.mark.slow
def test_the_report_has_every_file_and_holds_out_configs(resumed_run):
    result, out = resumed_run["result"], resumed_run["out"]
    for name in compare.REPORT_FILES:
        assert result.files[name] == out / name and (out / name).stat().st_size > 0, name
    for name in (compare.PLOT_LATENCY, compare.PLOT_PREDICTED, compare.PLOT_LAYERS):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / compare.RESULTS_JSON).read_text())
    # Untuned only (the records folder is empty), so the run is not complete and says why.
    assert report["complete"] is False and not result.complete
    assert sorted(report["missing"]) == [f"{label} tuned: no tuning records in {resumed_run['records']}"
                                         for label in TINY_LABELS]
    ev = report["evaluation"]["untuned"]
    assert ev["split"] == {"train": ["mobilenet_v2 w=0.35 r=32", "mobilenet_v2 w=0.35 r=96"],
                           "test": ["mobilenet_v2 w=0.35 r=64"]}
    assert set(ev["results"]) == {"naive", "linear", "roofline", "layerwise"}
    for r in ev["results"].values():
        assert r["metrics"]["n"] == 1 and r["metrics"]["mape"] >= 0
    assert "tuned: 0 usable MobileNetV2 configuration(s)" in " ".join(report["notes"])
    layer = report["per_layer"]
    assert layer["label"] == "mobilenet_v2-0.35-96" and layer["variant"] == "untuned" and not layer["is_reference"]
    assert not layer["unmatched_layers"] and not layer["unmatched_kernels"]
    rows = (out / compare.RESULTS_CSV).read_text().splitlines()
    assert len(rows) == 1 + 2 * len(TINY_LABELS)
    assert rows[0].startswith("label,model,width,resolution")
    assert sum(",untuned,ok,1," in r for r in rows) == 3 and sum(",tuned,missing" in r for r in rows) == 3
    summary = (out / compare.SUMMARY).read_text()
    assert "**INCOMPLETE**" in summary and "interrupted" not in summary.split("## In numbers")[0]
    assert "No usable tuned points" in summary and "| linear |" in summary
    assert "Held out: mobilenet_v2 w=0.35 r=64." in summary and "emulated" not in summary


@pytest.mark.slow
def test_rerunning_a_finished_grid_measures_nothing_and_an_emulated_measurer_is_flagged(resumed_run, tmp_path):
    measurer = CountingMeasurer(emulated=True)
    result = run_compare(targets.load("host"), resumed_run["out"], grid=resumed_run["grid"],
                         records_dir=resumed_run["records"], measurer=measurer, progress=False, passes=3)
    assert measurer.measured == [] and result.reused == 3
    summary = (resumed_run["out"] / compare.SUMMARY).read_text()
    assert "emulated board: timings meaningless" in summary
    assert json.loads((resumed_run["out"] / compare.RESULTS_JSON).read_text())["emulated"] is True


def test_points_of_another_target_are_not_mixed_in(resumed_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(resumed_run["out"], other)
    spec = targets.load(str(Path(targets.TARGETS_DIR) / "x86-64-avx2.toml"))
    if spec.name == targets.load("host").name:
        spec = targets.load(str(Path(targets.TARGETS_DIR) / "x86-64-avx512.toml"))
    with pytest.raises(UserError, match="holds points of target .* choose another report folder"):
        run_compare(spec, other, grid=resumed_run["grid"], records_dir=resumed_run["records"], progress=False)


def test_a_torn_last_line_is_dropped_and_the_file_stays_appendable(tmp_path):
    path = tmp_path / compare.POINTS_FILE
    good = {"key": "a|untuned", "label": "a"}
    path.write_text(json.dumps(good) + "\n" + '{"key": "b|unt')  # killed mid-write
    store = compare.PointStore(path)
    assert list(store.points) == ["a|untuned"] and store.dropped == 1
    store.add({"key": "b|untuned", "label": "b"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a|untuned", "b|untuned"]


def test_one_run_per_report_folder(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    held = _lock_report_dir(out)
    try:
        with pytest.raises(UserError, match="in use by another compare run"):
            run_compare(targets.load("host"), out, grid=_grid_file(tmp_path), progress=False)
    finally:
        os.close(held)


@pytest.mark.slow
def test_tuned_points_are_tied_to_the_records_they_were_measured_with(tmp_path):
    records = tmp_path / "records"
    assert records_fingerprint(records) is None  # missing folder
    records.mkdir()
    (records / "database_workload.json").write_text("")
    assert records_fingerprint(records) is None  # empty files: nothing to apply
    (records / "database_tuning_record.json").write_text('[0, {"run_secs": [1e-5]}]\n')
    before = records_fingerprint(records)
    with open(records / "database_tuning_record.json", "a") as f:
        f.write('[0, {"run_secs": [9e-6]}]\n')
    assert before is not None and records_fingerprint(records) not in (None, before)


@pytest.mark.slow
def test_a_tuned_point_goes_stale_only_when_records_of_its_own_kernels_change(tmp_path):
    from mnv2_tvm.tuning import records_digest_for, workload_digests

    records = tmp_path / "records"
    records.mkdir()
    (records / "database_workload.json").write_text('["111","AAAA"]\n["222","BBBB"]\n')
    (records / "database_tuning_record.json").write_text('[0,{"run_secs":[1e-5]}]\n')
    mine = ["111", "333"]  # 333: a kernel of the point the records do not hold (yet)
    before = records_digest_for(workload_digests(records), mine)

    def append(path: str, line: str) -> None:
        with open(records / path, "a") as f:
            f.write(line + "\n")

    append("database_tuning_record.json", '[1,{"run_secs":[2e-5]}]')  # another config's kernel
    assert records_digest_for(workload_digests(records), mine) == before
    append("database_tuning_record.json", '[0,{"run_secs":[9e-6]}]')  # a better schedule of its own
    after = records_digest_for(workload_digests(records), mine)
    assert after != before
    append("database_workload.json", '["333","CCCC"]')
    assert records_digest_for(workload_digests(records), mine) == after  # a workload alone applies nothing
    append("database_tuning_record.json", '[2,{"run_secs":[3e-5]}]')  # its untuned kernel now has one
    assert records_digest_for(workload_digests(records), mine) != after


def _other_workload() -> list:
    """A workload line of a kernel no MobileNetV2 has."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((3,), name="a")
    b = te.compute((3,), lambda i: a[i] * 3.0, name="b")
    return [str(x) for x in ms.database.Workload(tvm.IRModule({"main": te.create_prim_func([a, b])})).as_json()]


@pytest.mark.slow
def test_a_tuned_grid_end_to_end_and_only_points_whose_own_records_change_are_measured_again(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"model": "mobilenet_v2", "width": 0.35, "resolutions": [32, 64]}]))
    out, records = tmp_path / "report", tmp_path / "records"
    # The host's fastest build (NCHW8c on x86): its hand-written candidates tune in half NCHW's time.
    host = targets.load(targets.fastest_host_target_name())
    first = CountingMeasurer()
    result = run_compare(host, out, grid=grid, records_dir=records, measurer=first, tune_trials_per_config=12,
                         progress=False, passes=1)
    assert sorted(first.measured) == ["mobilenet_v2-0.35-32"] * 2 + ["mobilenet_v2-0.35-64"] * 2
    tuned = {p["label"]: p for p in _points(out) if p["variant"] == "tuned"}
    for p in tuned.values():
        assert p["status"] == "ok" and p["tasks_tuned"] > 0 and p["latency_ms"] > 0, p
        assert len(p["task_workloads"]) == p["tasks_total"] and p["records_fingerprint"]
    assert result.reused == 0 and result.measured == 4

    # Records of a kernel neither point has (another config's) leave both points valid...
    wl_file, rec_file = records / "database_workload.json", records / "database_tuning_record.json"
    lines = wl_file.read_text().splitlines()
    with open(wl_file, "a") as f:
        f.write(json.dumps(_other_workload()) + "\n")
    with open(rec_file, "a") as f:
        f.write(json.dumps([len(lines), json.loads(rec_file.read_text().splitlines()[0])[1]]) + "\n")
    again = CountingMeasurer()
    result = run_compare(host, out, grid=grid, records_dir=records, measurer=again, progress=False, passes=1)
    assert again.measured == [] and result.reused == 4

    # ...a new record of a kernel only 0.35/32 has makes just its tuned point stale.
    only32 = set(tuned["mobilenet_v2-0.35-32"]["task_workloads"]) - set(tuned["mobilenet_v2-0.35-64"]["task_workloads"])
    own = next(ln for ln in rec_file.read_text().splitlines() if json.loads(lines[json.loads(ln)[0]])[0] in only32)
    with open(rec_file, "a") as f:
        f.write(own + "\n")
    third = CountingMeasurer()
    result = run_compare(host, out, grid=grid, records_dir=records, measurer=third, progress=False, passes=1)
    assert third.measured == ["mobilenet_v2-0.35-32"] and result.reused == 3


# --------------------------------------------------------------------------------------
# Built-in grids and the board measurer's command line
# --------------------------------------------------------------------------------------


def test_the_quick_grid_is_built_in_and_spans_the_madd_range():
    from mnv2_tvm.madds import count

    grid = compare.grid_configs("quick")
    assert grid == compare.quick_grid() == compare.grid_configs("QUICK")
    assert [(c.width, c.resolution) for c in grid] == [(0.35, 96), (0.35, 160), (0.35, 224),
                                                       (1.0, 96), (1.0, 160), (1.0, 224)]
    madds = [count(c).madds for c in grid]
    assert max(madds) / min(madds) > 20 and compare.REFERENCE_CONFIG in grid
    assert compare.grid_configs("default") == compare.default_grid()


@pytest.mark.parametrize("args, needle", [
    (["--rpc", "127.0.0.1:1", "--ssh", "root@127.0.0.1"], "exactly one of --rpc"),
    (["--rpc", "nonsense"], "--rpc takes HOST:PORT"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--grid", "no-such-grid.json"], "grid file no-such-grid.json does not exist"),
])
def test_compare_flags_are_checked_before_anything_runs(tmp_path, capsys, args, needle):
    from mnv2_tvm.cli import main

    rc = main(["compare", "--target", "rpi4b", "-o", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r" / compare.POINTS_FILE).exists()


def test_board_kernel_rows_become_calls_in_execution_order():
    rows = [{"name": "fused_conv2d1_add", "calls": 2, "ms_per_call": 0.5, "args": [[1, 8, 4, 4], [8, 8, 1, 1], [1, 8, 4, 4]],
             "dtypes": ["float32"] * 3, "at": [1, 3]},
            {"name": "fused_conv2d_add", "calls": 1, "ms_per_call": 2.0, "args": [[1, 3, 8, 8], [8, 3, 3, 3], [1, 8, 4, 4]],
             "dtypes": ["float32"] * 3, "at": [0]},
            {"name": "mean", "calls": 1, "ms_per_call": 0.1, "args": [[1, 8, 4, 4], [1, 8]], "dtypes": ["float32"] * 2,
             "at": [2]}]
    kernels = board_kernels(rows)
    assert [k.name for k in kernels] == ["fused_conv2d_add", "fused_conv2d1_add", "mean", "fused_conv2d1_add"]
    assert kernels[0].madds == 8 * 16 * 27 and kernels[1].madds == 8 * 16 * 8 and kernels[2].madds is None
    assert kernels[0].bytes == 4 * (3 * 64 + 8 * 27 + 8 * 16) and kernels[2].output_shape == (1, 8)


# --------------------------------------------------------------------------------------
# On the virtual aarch64 board (emulated: its timings are never checked, only that the
# report says they are emulation)
# --------------------------------------------------------------------------------------


BOARD_GRID = [{"model": "mobilenet_v2", "width": 0.35, "resolutions": [96, 128]}]


@pytest.fixture(scope="module")
def compare_board(virtual_board):
    b = virtual_board()
    yield b
    virtual_board.stop(b)


@pytest.mark.slow
def test_compare_on_the_virtual_board_over_ssh(compare_board, tmp_path, capsys):
    from test_deploy import ours_left_on, ssh_args

    from mnv2_tvm.cli import main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(BOARD_GRID))
    (tmp_path / "no-records").mkdir()
    out = tmp_path / "report"
    argv = ["compare", "--target", "rpi4b", "--grid", str(grid), "--records", str(tmp_path / "no-records"),
            "-o", str(out), *ssh_args(compare_board), "--repeat", "2", "--min-repeat-ms", "0", "--passes", "1"]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "EMULATED board" in captured.out and "summary.md" in captured.out
    report = json.loads((out / compare.RESULTS_JSON).read_text())
    b = compare_board
    assert report["emulated"] is True and report["measurer"]["emulation"] == "emulated"
    assert report["measurer"]["name"] == f"ssh:{b.user}@{b.host}:{b.ssh_port}"
    assert report["measurer"]["board"]["uname_m"] == "aarch64"
    points = _points(out)
    assert [(p["label"], p["status"]) for p in points] == [("mobilenet_v2-0.35-96", "ok"), ("mobilenet_v2-0.35-128", "ok")]
    for p in points:
        s = p["settings"]
        assert s["emulated"] is True and s["max_abs_error"] <= 1e-4 and s["repeat"] == 2 and len(p["times_ms"]) == 2
        assert s["profile_method"] == "board-kernels-alone"
        # The board's per-kernel profile maps onto every conv/linear layer, as the host's does.
        assert p["layer_map"]["unmatched_layers"] == [] and p["layer_map"]["unmatched_kernels"] == []
        assert all(r["ms"] > 0 for r in p["layer_map"]["rows"])
    summary = (out / compare.SUMMARY).read_text()
    assert "emulated board: timings meaningless" in summary
    assert "timed alone on the board with time_evaluator" in summary
    assert (out / compare.PLOT_LAYERS).read_bytes()[:4] == b"\x89PNG"
    assert ours_left_on(b) == []

    # Resumed: nothing left to measure, so no board is opened, and the report still says emulated.
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0 and "0 points measured, 2 reused" in captured.out and "EMULATED board" in captured.out
    assert json.loads((out / compare.RESULTS_JSON).read_text())["measurer"]["board"]["uname_m"] == "aarch64"


@pytest.mark.slow
def test_compare_over_plain_rpc_says_the_board_may_be_emulated(compare_board, tmp_path, capsys):
    """Over RPC alone a board cannot be told real or emulated: the report says so, up front."""
    from test_deploy import opts_of, target_of

    from mnv2_tvm import board as B
    from mnv2_tvm.cli import main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"model": "mobilenet_v2", "width": 0.35, "resolution": 96}]))
    (tmp_path / "no-records").mkdir()
    out = tmp_path / "report"
    with B.open_board(target_of(compare_board), opts_of(compare_board)) as ob:
        rc = main(["compare", "--target", "rpi4b", "--grid", str(grid), "--records", str(tmp_path / "no-records"),
                   "-o", str(out), "--rpc", f"127.0.0.1:{ob.local_port}", "--repeat", "2", "--min-repeat-ms", "0",
                   "--no-profile", "--passes", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / compare.RESULTS_JSON).read_text())
    assert report["measurer"]["name"] == f"rpc:127.0.0.1:{ob.local_port}"
    assert report["measurer"]["emulation"] == "unknown" and report["emulated"] is False
    (point,) = _points(out)
    assert point["status"] == "ok" and point["settings"]["max_abs_error"] <= 1e-4 and "layer_map" not in point
    summary = (out / compare.SUMMARY).read_text()
    assert "**board not identified as real or emulated**" in summary.split("## In numbers")[0]
    assert "cannot be told whether that board is real or emulated" in summary
    assert "Per-layer times: not profiled in this run." in summary
