"""Tuning and benchmarking for a board without one: the emulated core (mnv2_tvm.tuning.emulated).

Tests marked slow start a 4-thread aarch64 guest under qemu (the target's core count): one tune of
the three-task tiny module (shared by the tests after it), and one modelled bench.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnv2_tvm import targets
from mnv2_tvm.cli import main
from mnv2_tvm.emulate import load_core_model
from mnv2_tvm.tuning import records as R
from mnv2_tvm.tuning import search

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_tune import SMALL_SEARCH, tiny_module  # noqa: E402


def _target_without_core(tmp_path: Path) -> Path:
    text = (REPO / "targets" / "rpi4b.toml").read_text()
    head = text.split("\n[core]")[0].rstrip().rsplit("\n#", 2)[0]
    path = tmp_path / "nocore.toml"
    path.write_text(head + "\n")
    return path


# ---------------------------------------------------------------------- no qemu


@pytest.mark.parametrize("verb", ["tune", "bench"])
def test_target_without_core_model_is_one_line_and_exit_2(verb, tmp_path, capsys):
    toml = _target_without_core(tmp_path)
    argv = [verb, "mobilenet_v2", "--width", "0.35", "--resolution", "96", "--target", str(toml)]
    argv += ["--trials", "8", "--tuning-records", str(tmp_path / "rec")] if verb == "tune" else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "no core model" in err[0] and "[core]" in err[0]
    assert all(k in err[0] for k in ("clock_ghz", "l2_latency", "dram_bandwidth_gbs", "sync_cycles"))
    assert not (tmp_path / "rec").exists()


@pytest.mark.parametrize("source, needle", [("x86-64-avx2", "one architecture"),
                                             (str(REPO / "schedules" / "x86-64-avx2"), "one architecture"),
                                             ("rpi5", "no records in")])
def test_transfer_from_a_target_it_cannot_use_is_one_line_and_exit_2(source, needle, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(targets, "SCHEDULES_DIR", tmp_path / "schedules")  # rpi5: nothing tuned
    argv = ["tune", "mobilenet_v2", "--width", "0.35", "--resolution", "96", "--target", "rpi4b", "--trials", "8",
            "--tuning-records", str(tmp_path / "rec"), "--transfer-from", source]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and source in err[0], err
    assert not (tmp_path / "rec").exists()


def test_emulated_and_board_records_are_never_mixed(tmp_path):
    target = targets.load("rpi4b").tvm_target()
    folder = tmp_path / "rec"
    R.open_records(folder, target, writable=True, measurement="emulated:Cortex-A72").close()
    assert R.measurement_of(R.read_meta(folder)) == "emulated:Cortex-A72"
    with pytest.raises(R.RecordsError) as e:
        R.open_records(folder, target, writable=True, measurement=R.BOARD_MEASUREMENT).close()  # tune() on a board
    assert "\n" not in str(e.value) and "emulated core" in str(e.value)
    board = tmp_path / "board"
    R.open_records(board, target, writable=True, measurement=R.BOARD_MEASUREMENT).close()
    assert R.measurement_of(R.read_meta(board)) == R.BOARD_MEASUREMENT
    with pytest.raises(R.RecordsError, match="not mixed"):
        R.open_records(board, target, writable=True, measurement="emulated:Cortex-A72").close()
    R.open_records(board, target, writable=False).close()  # reading either kind is fine
    assert targets.records_dir("rpi4b", emulated=True) == targets.records_dir("rpi4b") / targets.EMULATED_SUBDIR


def test_costs_of_another_core_model_are_kept_apart(tmp_path):
    """Records costed with other [core] figures (or another formula) are not comparable: a run of
    the current model refuses to add to them and says how to start from them instead."""
    import dataclasses

    from mnv2_tvm.emulate import core_model
    from mnv2_tvm.tuning.emulated import measurement_label

    core = load_core_model("rpi4b")
    assert core.version == load_core_model("rpi4b").version  # a pure function of the table
    assert load_core_model("rpi3b").version == load_core_model("rpi3b-aarch64").version  # one core, one model
    older = dataclasses.replace(core, ooo_window=core.ooo_window + 1)
    assert older.version != core.version
    assert dataclasses.replace(core, sources={}).version == core.version  # where a figure comes from costs nothing
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core_model, "FORMULA_VERSION", core_model.FORMULA_VERSION + 1)
        changed = core.version
    assert changed != core.version
    target = targets.load("rpi4b").tvm_target()
    folder = tmp_path / "rec"
    R.open_records(folder, target, writable=True, measurement=measurement_label(older)).close()
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    with pytest.raises(R.RecordsError) as e:
        R.open_records(folder, target, writable=True, measurement=measurement_label(core)).close()
    assert "\n" not in str(e.value) and "not comparable" in str(e.value) and f"--transfer-from {folder}" in str(e.value)
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before


# ---------------------------------------------------------------------- under qemu


@pytest.fixture(scope="module")
def backend(virtual_board_setup):
    subprocess.run(["bash", str(REPO / "scripts" / "setup_emulator.sh")], check=True)
    from mnv2_tvm.tuning.emulated import backend_for

    b = backend_for(targets.load("rpi4b"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def emulated_tune(backend, tmp_path_factory):
    """8 trials of the tiny module for rpi4b on its emulated core (records shared by the tests)."""
    from mnv2_tvm.tuning import tune

    mod, params, _, _ = tiny_module()
    folder = tmp_path_factory.mktemp("emu") / "rpi4b" / targets.EMULATED_SUBDIR
    target = targets.load("rpi4b").tvm_target()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "SEARCH_KWARGS", SMALL_SEARCH)
        import io
        import contextlib

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            report = tune(mod, target, folder, 8, params=params, runner=backend, seed=1)
    return folder, report, (mod, params, target), err.getvalue()


@pytest.mark.slow
def test_tuning_without_a_board_is_labelled_emulated(emulated_tune):
    folder, report, _, _ = emulated_tune
    meta = json.loads((folder / R.META_FILE).read_text())
    assert meta["measurement"] == f"emulated:Cortex-A72 (model {load_core_model('rpi4b').version})"
    assert report.trials_run >= 8 and report.estimated_e2e_us is not None
    db = R.RecordsDatabase(folder, writable=False)
    valid = [r for r in db.get_all_tuning_records() if r.run_secs and float(r.run_secs[0]) < 1e9]
    assert len(valid) >= 3  # every task has a modelled cost
    assert all(0 < float(r.run_secs[0]) < 1.0 for r in valid)


@pytest.mark.slow
def test_progress_says_emulated(emulated_tune, capfd):
    _, _, _, console = emulated_tune
    text = console + capfd.readouterr().err
    log = (emulated_tune[0] / R.LOG_FILE).read_text()
    assert "emulated Cortex-A72" in text or "emulated Cortex-A72" in log


@pytest.mark.slow
def test_second_identical_run_measures_nothing(emulated_tune, backend):
    from mnv2_tvm.tuning import tune

    folder, _, (mod, params, target), _ = emulated_tune
    before = (folder / R.RECORD_FILE).read_bytes()
    report = tune(mod, target, folder, 8, params=params, runner=backend, seed=1, progress=False)
    assert report.trials_run == 0 and report.already_done
    assert (folder / R.RECORD_FILE).read_bytes() == before


@pytest.mark.slow
def test_a_records_cost_is_reproduced_bit_for_bit(emulated_tune, backend):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from mnv2_tvm import tvm_compat
    from mnv2_tvm.tuning.builder import _builder_worker_build
    from mnv2_tvm.tuning.emulated import measure_artifact

    folder, _, (_, _, target), _ = emulated_tune
    tvm_compat.import_tensor_intrinsics(True)
    db = R.RecordsDatabase(folder, writable=False)
    rec = min((r for r in db.get_all_tuning_records() if r.run_secs and float(r.run_secs[0]) < 1e9),
              key=lambda r: -float(r.run_secs[0]))  # the costliest: the most work
    sch = tvm.s_tir.Schedule(rec.workload.mod, debug_mask=0)
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    artifact = _builder_worker_build(sch.mod, target, "tar")
    args = [([int(d) for d in j[2]], str(j[1])) for j in (a.as_json() for a in rec.args_info)]
    first, err1 = measure_artifact(backend.core, backend.cross_compiler, artifact, args)
    again, err2 = measure_artifact(backend.core, backend.cross_compiler, artifact, args)
    assert err1 is None and err2 is None, (err1, err2)
    assert first == again
    assert float(rec.run_secs[0]) == pytest.approx(first[0], rel=1e-6)
    # Through MetaSchedule's runner interface too.
    ri = ms.runner.RunnerInput(artifact, "cpu", rec.args_info)
    run = backend.make_runner()
    try:
        (res,) = [f.result() for f in run.run([ri])]
    finally:
        run.close()
    assert res.error_msg is None and float(res.run_secs[0]) == pytest.approx(first[0], rel=1e-6)


@pytest.mark.slow
def test_a_crashing_candidate_is_one_failed_measurement(backend, tmp_path):
    from mnv2_tvm.tuning.emulated import measure_artifact

    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    secs, err = measure_artifact(backend.core, backend.cross_compiler, str(junk), [([4], "float32")])
    assert secs is None and err.startswith("EmulatedRunner:")
    crashed = backend.core.crash_for_test()
    assert not crashed.ok
    assert backend.core._proc is not None and backend.core._proc.poll() is None  # the guest lives on


@pytest.mark.slow
def test_bench_without_a_board_prints_modelled_figures(backend, tmp_path, capsys, monkeypatch):
    from mnv2_tvm import models

    built = []
    build = models.build
    monkeypatch.setattr(models, "build", lambda *a, **k: built.append(1) or build(*a, **k))
    # resolution 32: the compile is the slow part; an empty records folder: untuned.
    argv = ["bench", "mobilenet_v2", "--width", "0.35", "--resolution", "32", "--target", "rpi4b",
            "--tuning-records", str(tmp_path / "none"), "-o", str(tmp_path / "bundle"), "--profile"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "MODELLED (emulated Cortex-A72 x4), not measured" in out
    assert " ms modelled" in out and " cycles" in out and " instructions" in out
    # Each kernel modelled alone from the bundle's kernel library and table: the model is built
    # once, to compile it, and never again for the profile.
    assert "per kernel (each modelled alone" in out and "failed under emulation" not in captured.err
    assert len(built) == 1 and "rebuilding" not in captured.err
    table = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["kernels"]["table"]
    lines = out.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("per kernel")) + 2  # after the column titles
    assert sorted(ln.split()[0] for ln in lines[first:]) == sorted(k["name"][:44] for k in table)


@pytest.mark.slow
def test_a_boards_record_wins_over_an_emulated_one(emulated_tune, tmp_path):
    folder, _, (_, _, target), _ = emulated_tune
    emu = R.RecordsDatabase(folder, writable=False)
    rec = next(r for r in emu.get_all_tuning_records() if r.run_secs and float(r.run_secs[0]) < 1e9)
    board_dir = tmp_path / "board"
    R.open_records(board_dir, target, writable=True, measurement=R.BOARD_MEASUREMENT).close()
    board = R.RecordsDatabase(board_dir, writable=True)
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    slower = ms.database.TuningRecord(rec.trace, board.commit_workload(rec.workload.mod), [1.0], rec.target,
                                      rec.args_info)
    board.commit_tuning_record(slower)  # slower than the emulated figure, and still preferred
    view = R.PreferringDatabase([board, emu])
    (top,) = view.get_top_k(view.commit_workload(rec.workload.mod), 1)
    assert float(top.run_secs[0]) == pytest.approx(1.0)
    others = [r for r in emu.get_all_tuning_records() if not tvm_ffi.structural_equal(r.workload.mod, rec.workload.mod)
              and r.run_secs and float(r.run_secs[0]) < 1e9]
    if others:  # a workload the board lacks: the emulated record answers
        (fallback,) = view.get_top_k(view.commit_workload(others[0].workload.mod), 1)
        assert fallback is not None
    board.close()


@pytest.mark.slow
def test_compare_without_a_board_reports_modelled_costs(backend, tmp_path, capsys):
    """compare --target rpi4b, no board: the grid tuned and costed on the emulated core, marked modelled,
    its records beside (never among) a board's."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"model": "mobilenet_v2", "width": 0.35, "resolution": 32}]))
    records, out = tmp_path / "records", tmp_path / "report"
    argv = ["compare", "--target", "rpi4b", "--grid", str(grid), "--tune-trials", "1", "--no-profile",
            "--tuning-records", str(records), "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "no board given" in captured.err and "MODELLED on the emulated Cortex-A72 x4 core" in captured.out
    assert not (records / targets.RECORD_FILE).exists() and (records / targets.EMULATED_SUBDIR / targets.RECORD_FILE).is_file()
    report = json.loads((out / "results.json").read_text())
    assert report["modelled"] == "Cortex-A72 x4" and not report["emulated"]
    points = {p["variant"]: p for p in report["points"] if p["status"] == "ok"}
    assert set(points) == {"untuned", "tuned"} and all(p["settings"]["modelled"] for p in points.values())
    assert 0 < points["tuned"]["latency_ms"] < points["untuned"]["latency_ms"]  # one schedule per kernel already wins
    assert "modelled, not measured" in (out / "summary.md").read_text()
