"""``mnv2-tvm``: argument parsing only; each subcommand calls one function of the package.

Verbs and flags follow the retired ``tvmc`` (tune / compile / run, --target, --rpc-tracker,
--rpc-key, --tuning-records) so TVM users feel at home.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compare import DEFAULT_PASSES
from .errors import UserError

if TYPE_CHECKING:
    from . import board


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import MODELS

    p.add_argument("model", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier, any in (0, 4]; the paper's are 0.35 0.5 0.75 1.0 1.3 1.4")
    p.add_argument("--resolution", type=int, help="input size (default: 224, 320 or 513 by model)")
    p.add_argument("--num-classes", type=int, help="classes (default: 1000, 81 or 21 by model)")
    p.add_argument("--output-stride", type=int, default=16, choices=(8, 16), help="DeepLab only")
    p.add_argument("--weights", type=Path, help="state dict file (torchvision layout for mobilenet_v2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the fixed input")


def _config(args: argparse.Namespace):
    from .models import ModelConfig

    return ModelConfig(args.model, args.width, args.resolution, args.num_classes, args.output_stride)


def cmd_madds(args: argparse.Namespace) -> None:
    from .madds import count

    result = count(_config(args))
    if args.json:
        print(json.dumps(result.to_dict(per_layer=args.per_layer)))
        return
    if args.per_layer:
        print(f"{'layer':36s} {'kind':10s} {'output':>18s} {'MAdds':>13s} {'params':>10s}")
        for layer in result.layers:
            shape = "x".join(map(str, layer.output_shape[1:]))
            print(f"{layer.name:36s} {layer.kind:10s} {shape:>18s} {layer.madds:13,d} {layer.params:10,d}")
    print(f"{result.config.label}: {result.madds / 1e6:,.1f}M MAdds, {result.params / 1e6:.3f}M params")


def cmd_targets(args: argparse.Namespace) -> None:
    from . import targets

    host, fastest = targets.host_target_name(), targets.fastest_host_target_name()
    for name in targets.available():
        spec = targets.load(name)
        print(("* " if name == host else "+ " if name == fastest else "  ") + spec.summary())
    print("(* = this host; `--target host` picks it)")
    if fastest != host:
        print(f"(+ = the fastest build with shipped schedules here: `--target {fastest}`)")


def cmd_export(args: argparse.Namespace) -> None:
    from .lower import export_onnx
    from .models import build

    cfg = _config(args)
    path = export_onnx(build(cfg, args.seed, args.weights), cfg, args.output)
    print(f"wrote {path} ({cfg.label}, opset 17, input 'input' {list(cfg.input_shape)})")


def cmd_compile(args: argparse.Namespace) -> None:
    from . import targets
    from .compile import compile_bundle

    cfg = _config(args)
    spec = targets.load(args.target)
    records = targets.records_dir(spec, args.tuning_records)
    out = args.output or Path("build") / f"{cfg.label}-{spec.name}"
    result = compile_bundle(cfg, spec, out, frontend=args.frontend, records_dir=records,
                            weights=args.weights, seed=args.seed)
    m, s = result.manifest, result.seconds
    tuned = len(m["tuning"]["tuned"])
    total = tuned + len(m["tuning"]["fallback"])
    print(f"{cfg.label} for {spec.name} ({m['arch']}): {result.bundle_dir}/  "
          f"[{m['madds'] / 1e6:,.0f}M MAdds, {m['params'] / 1e6:.2f}M params, {tuned}/{total} tasks tuned"
          + (f" ({m['tuning']['emulated_records']} by emulated-core records)" if m["tuning"].get("emulated_records") else "")
          + f"; lower {s['lower']:.1f} s, build {s['build']:.1f} s, link {s['link']:.1f} s]")
    if spec.device_kind == "opencl":
        print("note: OpenCL kernels are embedded in the library; no OpenCL device here can run them "
              f"as a model: `mnv2-tvm check-opencl {result.bundle_dir}` runs each kernel on a local "
              "OpenCL device (PoCL) against the CPU")
    if args.target == targets.HOST_ALIAS and (fastest := targets.fastest_host_target_name()) != spec.name:
        print(f"note: the fastest build with shipped schedules on this host is `--target {fastest}` "
              f"(`mnv2-tvm targets`)")


def cmd_tune(args: argparse.Namespace) -> None:
    if args.trials <= 0:
        raise UserError(f"--trials must be positive, not {args.trials}")
    if not args.board_wait > 0:
        raise UserError(f"--board-wait must be a positive number of seconds, not {args.board_wait:g}")
    from . import targets

    spec = targets.load(args.target)
    spec.check_llvm_triple()
    if getattr(args, "ssh", None):
        _tune_over_ssh(args)
        return
    from .remote import parse_hostport
    from .tuning import tune_model

    tracker = parse_hostport(args.rpc_tracker, "--rpc-tracker") if args.rpc_tracker else None
    _warn_exposed(tracker, "RPC tracker (and the boards behind it)")
    if tracker is None and not spec.is_host:
        _tune_emulated(args, spec)
        return
    records = targets.records_dir(spec, args.tuning_records)
    report = tune_model(_config(args), spec, records, args.trials, frontend=args.frontend, weights=args.weights,
                        tracker=tracker, rpc_key=args.rpc_key or spec.rpc_key, seed=args.seed, transfer=args.transfer,
                        transfer_from=_transfer_sources(args, spec, records), board_wait_s=args.board_wait)
    _stopped_for_boards(args, report, records)


def _stopped_for_boards(args: argparse.Namespace, report: Any, records: Path) -> None:
    """A run the runner stopped because no board answered within --board-wait ends as one line:
    why, what is kept, and the exact command that resumes it (exit 2)."""
    import shlex

    reason = getattr(report, "stop_reason", None)
    if not reason:
        return
    argv = getattr(args, "argv", None)
    command = "mnv2-tvm " + shlex.join(argv if argv is not None else sys.argv[1:])
    raise UserError(f"tuning stopped: {reason}; the {report.trials_in_db_after} trials measured for this model are "
                    f"kept in {records}; once a board answers, resume with: {command}")


def _transfer_sources(args: argparse.Namespace, spec: Any, writing: Path) -> list[Path]:
    """Records folders to learn from besides ``writing`` (the folder this run tunes into): those of
    ``--transfer-from`` targets (board-measured and emulated), and with ``--transfer`` on a board,
    the target's own emulated-core records (shipped for the Pis): a board run starts from them."""
    from . import targets

    def has(f: Path) -> bool:
        return (f / targets.RECORD_FILE).is_file() and f.resolve() != writing.resolve()

    folders: list[Path] = []
    for name in args.transfer_from or ():
        if (Path(name) / targets.RECORD_FILE).is_file():  # a records folder, e.g. costs of an older core model
            folders.append(_transfer_folder(Path(name), spec, writing))
            continue
        other = targets.load(name)
        if other.arch != spec.arch:
            raise UserError(f"--transfer-from {name}: its code is {other.arch}, {spec.name}'s is {spec.arch}; "
                            "schedules carry over only between cores of one architecture")
        found = [f for f in (targets.records_dir(other), targets.records_dir(other, emulated=True)) if has(f)]
        if not found:
            raise UserError(f"--transfer-from {name}: no records in {targets.records_dir(other)} "
                            f"(tune {name} first)")
        folders += found
    own = targets.records_dir(spec, emulated=True)
    if args.transfer and has(own) and own not in folders:
        folders.append(own)
    return folders


def _transfer_folder(folder: Path, spec: Any, writing: Path) -> Path:
    """A records folder given to --transfer-from: readable, not the one written, code of the same
    architecture as ``spec`` (its meta's target says)."""
    from .tuning.records import RecordsError, read_meta

    if folder.resolve() == writing.resolve():
        raise UserError(f"--transfer-from {folder} is the folder this run tunes into; it already starts from it")
    try:
        meta = read_meta(folder) or {}
    except RecordsError as e:
        raise UserError(f"--transfer-from {folder}: {e}") from None
    triple = str((meta.get("target") or {}).get("mtriple", ""))  # a host target's has none: x86-64
    theirs = "aarch64" if triple.startswith("aarch64") else "arm" if triple.startswith("arm") else "x86_64"
    if theirs != spec.arch:
        raise UserError(f"--transfer-from {folder}: its records are {theirs} code, {spec.name}'s is {spec.arch}; "
                        "schedules carry over only between cores of one architecture")
    return folder


def _tune_emulated(args: argparse.Namespace, spec: Any) -> None:
    """tune for a board without one: candidates costed on the target's emulated core ([core])."""
    from . import targets
    from .tuning import tune_model
    from .tuning.emulated import backend_for

    spec.core  # one line naming the missing keys when the target has no core model
    records = targets.records_dir(spec, args.tuning_records, emulated=True)
    sources = _transfer_sources(args, spec, records)
    backend = backend_for(spec)  # one line naming the set-up command when qemu, plugin or userland is missing
    _sigterm_as_interrupt()
    print(f"no board given: tuning {spec.name} on its emulated core ({backend.description}); "
          f"records in {records}", file=sys.stderr)
    try:
        report = tune_model(_config(args), spec, records, args.trials, frontend=args.frontend, weights=args.weights,
                            seed=args.seed, transfer=args.transfer, runner=backend, transfer_from=sources)
    finally:
        backend.close()
    failed = sum(getattr(t, "run_errors", 0) for t in getattr(report, "tasks", []))
    if failed and failed == getattr(report, "trials_run", -1):
        raise UserError(f"every emulated measurement failed; see tune.log in {records}")


def cmd_prune(args: argparse.Namespace) -> None:
    from . import targets
    from .tuning import RecordsError, prune

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {args.top_k}")
    records = targets.records_dir(args.target, args.tuning_records)
    if not (records / targets.RECORD_FILE).is_file():
        raise UserError(f"{records} holds no tuning records")
    try:
        before, after = prune(records, args.top_k)
    except RecordsError as e:
        raise UserError(str(e)) from None
    print(f"{records}: kept {after} of {before} records (best {args.top_k} per workload)")


def cmd_compare(args: argparse.Namespace) -> None:
    import contextlib

    from . import targets
    from .compare import BoardMeasurer, HostMeasurer, run_compare

    if args.tune_trials < 0:
        raise UserError(f"--tune-trials must be 0 or more, not {args.tune_trials}")
    if args.repeat < 1:
        raise UserError(f"--repeat must be at least 1, not {args.repeat}")
    if args.passes < 1:
        raise UserError(f"--passes must be at least 1, not {args.passes}")
    if args.min_repeat_ms < 0:
        raise UserError(f"--min-repeat-ms must be >= 0, not {args.min_repeat_ms}")
    spec = targets.load(args.target)
    measurer: Any
    if args.rpc or args.rpc_tracker or args.ssh:
        from .bench import Where
        from .remote import parse_hostport

        target, opts = _ssh(args)
        where = Where(rpc=parse_hostport(args.rpc, "--rpc") if args.rpc else None,
                      tracker=parse_hostport(args.rpc_tracker, "--rpc-tracker") if args.rpc_tracker else None,
                      key=(args.rpc_key or spec.rpc_key) if args.rpc_tracker else None, ssh=target, ssh_opts=opts,
                      wait_s=args.wait)
        _warn_exposed(where.rpc, "RPC server")
        _warn_exposed(where.tracker, "RPC tracker (and the boards behind it)")
        measurer = BoardMeasurer(where, arch=spec.arch, repeat=args.repeat, min_repeat_ms=args.min_repeat_ms,
                                 profile=not args.no_profile, session_timeout=args.session_timeout,
                                 rpc_timeout=args.rpc_timeout)
        _sigterm_as_interrupt()  # so the RPC server started on the board is stopped on the way out
    elif not spec.is_host:
        from .compare import ModelledMeasurer, grid_configs
        grid_configs(args.grid)  # a bad grid file is said before the emulator starts

        spec.core  # one line naming the missing keys when the target has no core model
        measurer = ModelledMeasurer(spec, profile=not args.no_profile)
        print(f"no board given: costing {spec.name} on its emulated core ({measurer.core_model.model} x{spec.cores}); "
              "modelled, not measured",
              file=sys.stderr)
    else:
        measurer = HostMeasurer(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    with measurer if not isinstance(measurer, HostMeasurer) else contextlib.nullcontext():
        result = run_compare(spec, args.output, grid=args.grid, records_dir=args.tuning_records,
                             measurer=measurer, tune_trials_per_config=args.tune_trials, profile=not args.no_profile,
                             passes=args.passes)
    state = "complete" if result.complete else "INCOMPLETE (run the same command again to continue)"
    emulated = (" [EMULATED board: timings meaningless]" if result.report.get("emulated")
                else f" [MODELLED on the emulated {result.report['modelled']} core]" if result.report.get("modelled")
                else "")
    print(f"report {state}{emulated}: {result.out_dir}/summary.md ({result.measured} points measured, "
          f"{result.reused} reused); plots: " + ", ".join(str(p) for n, p in result.files.items() if n.endswith(".png")))


def cmd_check_opencl(args: argparse.Namespace) -> int:
    """Exit status 0 when every kernel matches the CPU, 1 when one does not."""
    from . import opencl, targets

    if args.tolerance <= 0:
        raise UserError(f"--tolerance must be positive, not {args.tolerance}")
    device = opencl.open_device()  # before minutes of compiling
    if Path(args.model).is_dir():
        print(f"rebuilding the OpenCL kernels of bundle {args.model} ...", file=sys.stderr, flush=True)
        program, spec = opencl.bundle_program(args.model)
    else:
        if not args.target:
            raise UserError("give the OpenCL target to compile for: --target rk3399-mali, adreno640, ...")
        cfg = _config(args)
        spec = targets.load(args.target)
        opencl.require_opencl(spec)
        records = targets.records_dir(spec, args.tuning_records)
        print(f"compiling {cfg.label} for {spec.name} (no link: no cross compiler or NDK needed) ...",
              file=sys.stderr, flush=True)
        program = opencl.build_program(cfg, spec, frontend=args.frontend, records_dir=records,
                                       weights=args.weights, seed=args.seed)
    print(f"running {program.n_kernels} OpenCL kernels on {device.name} ...", file=sys.stderr, flush=True)
    result = opencl.check(program, device, tolerance=args.tolerance, seed=args.seed, progress=True, label=spec.name)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if result.failed or not args.summary:
            print(result.table(failed_only=args.summary))
        print(result.summary())
    return 0 if result.ok else 1


def cmd_run(args: argparse.Namespace) -> None:
    from .run import run_bundle

    run_bundle(args.bundle, image=args.input, save=args.save, time_it=args.time, top=args.top)


def _add_board_args(p: argparse.ArgumentParser) -> None:
    """The ways `bench` and `compare` reach a board: an RPC server, a tracker, or SSH."""
    p.add_argument("--rpc", metavar="HOST:PORT", help="the board behind this TVM RPC server (direct)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="a board behind this TVM RPC tracker")
    p.add_argument("--rpc-key", help="the boards' key at the tracker (default: the target's)")
    p.add_argument("--wait", type=float, default=120.0, metavar="S", help="wait this long for a free board (tracker)")
    _add_ssh_args(p)


def _add_ssh_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--ssh", metavar="USER@HOST[:PORT]", required=required,
                   help="the board over SSH: start its RPC server, tunnel to it, stop it afterwards")
    p.add_argument("--identity", "-i", type=Path, metavar="KEY", help="private key (default: ssh-agent, ~/.ssh/id_*)")
    p.add_argument("--known-hosts", type=Path, metavar="FILE", help="host keys to trust (default: ~/.ssh/known_hosts)")
    p.add_argument("--trust-host-key", metavar="SHA256:...",
                   help="accept this (unknown) host key fingerprint and record it in the known_hosts file")
    p.add_argument("--board-python", default="python3", metavar="CMD",
                   help="the board's Python that has the TVM runtime (default: python3)")
    p.add_argument("--ssh-keepalive", type=float, default=None, metavar="S",
                   help="give the SSH link up when it answers no keepalive for S seconds (default: 60; 0: never)")


def _ssh(args: argparse.Namespace) -> tuple[board.SshTarget | None, board.SshOptions | None]:
    """(SshTarget, SshOptions) from the SSH flags, or (None, None)."""
    from .board import SshOptions, SshTarget

    if not getattr(args, "ssh", None):
        return None, None
    if args.ssh_keepalive is not None and args.ssh_keepalive < 0:
        raise UserError(f"--ssh-keepalive must be >= 0, not {args.ssh_keepalive}")
    keepalive = {} if args.ssh_keepalive is None else {"keepalive": args.ssh_keepalive}
    return SshTarget.parse(args.ssh), SshOptions(identity=args.identity, known_hosts=args.known_hosts,
                                                 trust_host_key=args.trust_host_key, board_python=args.board_python,
                                                 **keepalive)


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so what was started on a board is stopped on the way out:
    during a tuning run like a first Ctrl-C (stop at the next safe point, report and records
    kept), since an exception raised inside TVM's callbacks comes back as a bare RuntimeError."""
    import signal

    from .tuning.interrupt import Sigint

    def handler(signum: int, frame: object) -> None:
        if Sigint.active is not None:
            Sigint.active.interrupt()
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _tune_over_ssh(args: argparse.Namespace) -> None:
    """tune --ssh: a private tracker here, the board's server registered to it through the SSH
    connection and kept alive (restarted, the link reconnected) while tuning, tune through the
    tracker, then stop both."""
    import logging

    from . import targets
    from .board import open_board
    from .remote import LocalTracker, wait_registered
    from .tuning import tune_model

    if args.rpc_tracker:
        raise UserError("give either --ssh (one board, tracker handled here) or --rpc-tracker, not both")
    _sigterm_as_interrupt()
    spec = targets.load(args.target)
    target, opts = _ssh(args)
    key = args.rpc_key or spec.rpc_key
    records = targets.records_dir(spec, args.tuning_records)
    sources = _transfer_sources(args, spec, records)

    def same_arch(info: dict) -> None:
        if info["arch"] != spec.arch:
            raise UserError(f"target {spec.name} is {spec.arch} but {target} is {info['uname_m']}; "
                            "tune for this board's target")

    log = logging.getLogger("mnv2_tvm.tuning.board")  # into tune.log, beside the runner's retries
    report = keeper = None
    try:
        with LocalTracker() as tracker, open_board(target, opts, tracker=(tracker.host, tracker.port), key=key,
                                                   precheck=same_arch, keep_alive=True, on_event=log.warning) as ob:
            keeper = ob.keeper
            if spec.cross_compiler is None:
                # Without a cross compiler here, MetaSchedule's stock upload sends a .tar the board links.
                rc, _, _ = ob.conn.run("command -v gzip && { command -v g++ || command -v gcc || command -v c++; }",
                                       timeout=60)
                if rc != 0:
                    print(f"warning: {target} lacks gzip or a C/C++ compiler and target {spec.name} names no cross "
                          "compiler: every measurement will fail (sudo apt install gzip g++ on the board)",
                          file=sys.stderr)
            wait_registered(tracker.host, tracker.port, key)
            print(f"tuning on {target} ({ob.info['uname_m']}) through a tracker on {tracker.address}, key {key}",
                  file=sys.stderr)
            report = tune_model(_config(args), spec, records, args.trials, frontend=args.frontend,
                                weights=args.weights, tracker=(tracker.host, tracker.port), rpc_key=key,
                                seed=args.seed, transfer=args.transfer, transfer_from=sources,
                                board_wait_s=args.board_wait)
    except UserError:
        if report is None or not report.stop_reason:
            raise
        # The board could not be reached to stop its server (open_board warned, naming the command
        # that stops it); why tuning stopped is the line to end with.
    if keeper is not None and keeper.restarts:
        print(f"note: the RPC server on {target} was restarted {keeper.restarts} time(s) while tuning; "
              f"tune.log in {records} says why", file=sys.stderr)
    _stopped_for_boards(args, report, records)
    failed = sum(getattr(t, "run_errors", 0) for t in getattr(report, "tasks", []))
    if failed and failed == getattr(report, "trials_run", -1):
        raise UserError(f"every measurement on {target} failed; see tune.log in {records} for the board's error")


def _warn_exposed(hostport: tuple[str, int] | None, what: str) -> None:
    from .remote import exposure_warning

    line = exposure_warning(*hostport, what) if hostport else None
    if line:
        print(line, file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import BenchSettings, Where, bench_bundle, print_result, resolve_bundle
    from .remote import parse_hostport

    settings = BenchSettings(number=args.number, repeat=args.repeat, min_repeat_ms=args.min_repeat_ms,
                             cache_flush=args.cache_flush, profile=args.profile, tolerance=args.tolerance,
                             session_timeout=args.session_timeout, rpc_timeout=args.rpc_timeout)
    target, opts = _ssh(args)
    where = Where(rpc=parse_hostport(args.rpc, "--rpc") if args.rpc else None,
                  tracker=parse_hostport(args.rpc_tracker, "--rpc-tracker") if args.rpc_tracker else None,
                  key=args.rpc_key, ssh=target, ssh_opts=opts, wait_s=args.wait)
    _warn_exposed(where.rpc, "RPC server")
    _warn_exposed(where.tracker, "RPC tracker (and the boards behind it)")
    if not (where.rpc or where.tracker or where.ssh):
        return _bench_modelled(args, settings)
    where.check()  # before minutes of compiling
    _sigterm_as_interrupt()
    bundle_dir = resolve_bundle(args.model, args.target, lambda: _config(args), out_dir=args.output,
                                frontend=args.frontend, weights=args.weights, seed=args.seed,
                                tuning_records=args.tuning_records)
    print_result(bench_bundle(bundle_dir, where, settings), args.json)


def _bench_modelled(args: argparse.Namespace, settings: Any) -> None:
    """bench without a board: the model costed on the target's emulated core, marked as modelled."""
    from . import bundle as bundle_mod
    from . import targets
    from .bench import bench_modelled, print_modelled, resolve_bundle
    from .emulate import EmulatedCore

    name = args.target
    if name is None and Path(args.model).is_dir():
        name = bundle_mod.load_manifest(Path(args.model))["target"]
    if name is None:
        raise UserError(f"bench {args.model} compiles the model first: say for which board with --target (e.g. rpi4b)")
    spec = targets.load(name)
    if spec.is_host:
        raise UserError(f"{spec.name} is this machine: time it with `mnv2-tvm run BUNDLE --time` (or "
                        "scripts/bench_host.py beside ONNX Runtime and PyTorch); bench measures a board "
                        "(--ssh, --rpc or --rpc-tracker) or models one without it (--target rpi4b)")
    spec.core  # one line naming the missing keys when the target has no core model
    EmulatedCore(spec.path, threads=spec.cores).close()  # set-up checked before minutes of compiling
    print(f"no board given: modelling {spec.name} on its emulated core", file=sys.stderr)
    _sigterm_as_interrupt()
    bundle_dir = resolve_bundle(args.model, args.target, lambda: _config(args), out_dir=args.output,
                                frontend=args.frontend, weights=args.weights, seed=args.seed,
                                tuning_records=args.tuning_records)
    print_modelled(bench_modelled(bundle_dir, settings), args.json)


def cmd_board(args: argparse.Namespace) -> None:
    from . import board

    target, opts = _ssh(args)
    _sigterm_as_interrupt()
    if args.action == "tunnel":
        _board_tunnel(args, target, opts)
        return
    with board.BoardConnection(target, opts) as conn:
        if args.action == "status":
            info = board.probe(conn)
            servers = board.list_servers(conn)
            if args.json:
                print(json.dumps({**info, "servers": [{**s.__dict__, "status": st} for s, st in servers]}, indent=2))
            else:
                print(f"{target}: {info['uname_m']} ({info['arch']}), {info.get('cpus')} CPUs"
                      + (f", {info['model']}" if info.get("model") else ""))
                print(f"  python {info['python']} ({info['executable']}), numpy {info.get('numpy', 'MISSING')}")
                tvm = info.get("tvm")
                print(f"  TVM {tvm + (' (runtime only)' if info.get('runtime_only') else '') if tvm else 'MISSING'}"
                      f"; this host has {board.host_tvm_version()}")
                if info.get("emulated"):
                    print("  emulated (qemu-user): timings there mean nothing")
                for s, st in servers:
                    print(f"  RPC server {s.name!r}: {st.lower()}, 127.0.0.1:{s.port} on the board, pgid {s.pgid}"
                          + (f", tracker {s.tracker} key {s.key}" if s.tracker else ""))
                if not servers:
                    print("  no RPC server started by mnv2-tvm")
            board.check_runtime(info, target)
        elif args.action == "start":
            info = board.probe(conn)
            board.check_runtime(info, target)
            state = board.start_server(conn, args.name, load_library=board.extra_runtime(conn, info))
            print(f"RPC server {state.name!r} runs on {target}, bound to the board's 127.0.0.1:{state.port} "
                  f"(process group {state.pgid}); reach it from here with `mnv2-tvm board tunnel --ssh {target} "
                  f"--name {state.name}`, stop it with `mnv2-tvm board stop --ssh {target} --name {state.name}`")
        elif args.action == "stop":
            state = board.stop_server(conn, args.name)
            print(f"stopped RPC server {args.name!r} (process group {state.pgid}) on {target}" if state else
                  f"no RPC server named {args.name!r} was started on {target} by mnv2-tvm; nothing to stop")
        elif args.action == "run":
            import numpy as np

            x = _load_npy(args.input) if args.input else None
            out, result = board.run_bundle_ssh(conn, args.bundle, x, check=x is None)
            if args.output:
                np.save(args.output, out)
            print(json.dumps(result))


def _load_npy(path: Path) -> Any:
    """An input array from a .npy file, or one line saying why it cannot be one."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--input {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--input {path} is a folder, not a .npy file") from None
    except (ValueError, OSError, EOFError, MemoryError) as e:  # MemoryError: a header declaring a huge shape
        raise UserError(f"--input {path} is not a readable .npy array ({e.__class__.__name__}); "
                        "save one with numpy.save") from None


def _board_tunnel(args: argparse.Namespace, target: board.SshTarget, opts: board.SshOptions) -> None:
    import time

    from . import board
    from .remote import parse_hostport, wait_registered

    tracker = parse_hostport(args.rpc_tracker, "--rpc-tracker") if args.rpc_tracker else None
    if tracker and not args.rpc_key:
        raise UserError("--rpc-tracker needs --rpc-key KEY: the key the board serves under")
    with board.open_board(target, opts, name=args.name, attach=True, tracker=tracker, key=args.rpc_key,
                          local_port=args.local_port) as ob:
        if tracker:
            wait_registered(*tracker, args.rpc_key)
        how = (f"registered at the tracker {tracker[0]}:{tracker[1]} under key {args.rpc_key}" if tracker else
               f"RPC at 127.0.0.1:{ob.local_port} here")
        print(f"{target}: {how} -> the board's 127.0.0.1:{ob.server.port} "
              f"({'started' if ob.started else 'already running'}); Ctrl-C to end"
              + (" and stop the server" if ob.started else ""), flush=True)
        try:
            while ob.conn.transport.is_active():
                time.sleep(1)
            raise UserError(f"the SSH connection to {target} was closed")
        except KeyboardInterrupt:
            pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnv2-tvm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("madds", help="multiply-adds and parameters of a model")
    _add_model_args(p)
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_madds)

    p = sub.add_parser("targets", help="list the device descriptions in targets/")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("export", help="write the model (batch norm folded) as ONNX")
    _add_model_args(p)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compile", help="compile a model into a bundle for a target")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="a targets/ name, 'host', or a .toml path")
    p.add_argument("--frontend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--tuning-records", "--records", type=Path, dest="tuning_records",
                   help="records folder (default: schedules/<target>/)")
    p.add_argument("-o", "--output", type=Path, help="bundle folder (default: build/<model>-<target>)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="tune a model's tasks with MetaSchedule into the target's records")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="a targets/ name, 'host', or a .toml path")
    p.add_argument("--trials", type=int, default=800, help="total measurements for this model (resumes)")
    p.add_argument("--frontend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--tuning-records", "--records", type=Path, dest="tuning_records",
                   help="records folder (default: schedules/<target>/)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on boards behind this RPC tracker")
    p.add_argument("--rpc-key", help="the boards' key at the tracker (default: the target's)")
    p.add_argument("--board-wait", type=float, default=300.0, metavar="S",
                   help="with --ssh or --rpc-tracker: while no board answers, wait this long for one (a candidate "
                        "whose board failed is measured again, not recorded); then stop, keeping what was "
                        "measured (default 300)")
    p.add_argument("--transfer", action="store_true",
                   help="start from what the database holds for other widths, resolutions and models: "
                        "train the cost model on it and give each task the best schedules of the "
                        "nearest layers of its kind, refitted to its shapes (new tasks first, then, "
                        "within --trials, tuned ones by time share); on a board, also from the target's "
                        "emulated-core records")
    p.add_argument("--transfer-from", action="append", metavar="TARGET|FOLDER",
                   help="also learn from another target's records (a core of the same architecture, e.g. "
                        "rpi4b for rpi5) or a records folder (e.g. one costed by an older core model), as "
                        "--transfer does from this one's; may be repeated")
    _add_ssh_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("prune", help="keep only the best records per workload (small enough for git)")
    p.add_argument("--target", default="host", help="a targets/ name, 'host', or a .toml path")
    p.add_argument("--tuning-records", "--records", type=Path, dest="tuning_records",
                   help="records folder (default: schedules/<target>/)")
    p.add_argument("--top-k", type=int, default=1)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("compare", help="tuned latency against MAdd predictions over a grid of configs")
    p.add_argument("--target", default="host", help="a targets/ name, 'host', or a .toml path")
    p.add_argument("--grid", default="default",
                   help="'default' (the paper's 25 MobileNetV2 configs + SSDLite + DeepLab), 'quick' (MobileNetV2 "
                        "0.35 and 1.0 x 96, 160, 224) or a JSON/TOML file of configs")
    p.add_argument("--tuning-records", "--records", type=Path, dest="tuning_records",
                   help="records folder (default: schedules/<target>/)")
    p.add_argument("--tune-trials", type=int, default=0, help="tune configs the records miss, N trials each")
    p.add_argument("-o", "--output", type=Path, default=Path("reports/compare"), help="report folder")
    _add_board_args(p)
    p.add_argument("--repeat", type=int, default=7, help="timed repeats per point and pass (their median)")
    p.add_argument("--passes", type=int, default=DEFAULT_PASSES,
                   help=f"timing passes over the grid; a point's latency is its fastest pass (default {DEFAULT_PASSES})")
    p.add_argument("--min-repeat-ms", type=int, default=100, help="stretch each repeat to at least this long")
    p.add_argument("--no-profile", action="store_true",
                   help="skip per-kernel timing (each kernel timed alone; no per-layer report)")
    p.add_argument("--session-timeout", type=float, default=0, metavar="S",
                   help="the board's server ends the session after S seconds (0: never)")
    p.add_argument("--rpc-timeout", type=float, default=0, metavar="S",
                   help="give up when the board answers one step (upload, load, a run, the timing loop) not within "
                        "S seconds (default 0: as `bench`)")
    p.set_defaults(func=cmd_compare)

    from .opencl import TOLERANCE

    p = sub.add_parser("check-opencl", help="run every OpenCL kernel of a model (or an OpenCL bundle) on a local "
                                            "OpenCL device (PoCL) and compare it with the CPU")
    _add_model_args(p)
    p.add_argument("--target", help="an OpenCL target: rk3399-mali, adreno640, ... (needed for a MODEL; a BUNDLE "
                                    "folder given as MODEL names its own)")
    p.add_argument("--frontend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--tuning-records", "--records", type=Path, dest="tuning_records",
                   help="records folder (default: schedules/<target>/)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest error allowed, relative to the output's largest magnitude (default {TOLERANCE:g})")
    p.add_argument("--summary", action="store_true", help="print only mismatches and the summary line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_opencl)

    p = sub.add_parser("run", help="run a bundle on this machine")
    p.add_argument("bundle", type=Path)
    p.add_argument("--input", type=Path, help="an image (default: the bundle's fixed random input)")
    p.add_argument("--save", type=Path, help="PNG of the mask (deeplabv3) or the boxes (ssdlite)")
    p.add_argument("--time", action="store_true", help="also time it (median of 5 repeats)")
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="run and time a bundle (or a model compiled for --target) on a board")
    _add_model_args(p)
    p.add_argument("--target", help="the board's targets/ name (needed to compile a MODEL)")
    p.add_argument("--frontend", default="torch", choices=("torch", "onnx"))
    p.add_argument("--tuning-records", "--records", type=Path, dest="tuning_records",
                   help="records folder when compiling (default: schedules/<target>/)")
    p.add_argument("-o", "--output", type=Path, help="bundle folder when compiling (default: build/<model>-<target>)")
    _add_board_args(p)
    p.add_argument("--number", type=int, default=10, help="runs averaged into one repeat")
    p.add_argument("--repeat", type=int, default=5, help="repeats (the samples of the statistics)")
    p.add_argument("--min-repeat-ms", type=int, default=0, help="grow --number until a repeat lasts this long")
    p.add_argument("--cache-flush", action="store_true",
                   help="with --profile: flush each kernel's weights and output from the CPU caches before each repeat")
    p.add_argument("--profile", action="store_true", help="also time each kernel alone (from the bundle's kernel library)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs error allowed against PyTorch")
    p.add_argument("--session-timeout", type=float, default=0, metavar="S",
                   help="the server ends the session after S seconds (0: never)")
    p.add_argument("--rpc-timeout", type=float, default=0, metavar="S",
                   help="give up when the board answers one step (upload, load, a run, the timing loop) not within "
                        "S seconds (default 0: 300 s, more for a long timing loop, at most --session-timeout + 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("board", help="a board over SSH: status, start/stop its RPC server, tunnel, run a bundle")
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = bsub.add_parser("status", help="architecture, Python, TVM runtime and RPC servers on the board")
    _add_ssh_args(b, required=True)
    b.add_argument("--json", action="store_true")
    b = bsub.add_parser("start", help="start a TVM RPC server on the board's loopback, detached")
    _add_ssh_args(b, required=True)
    b.add_argument("--name", default="default", help="server name, to run several (default: default)")
    b = bsub.add_parser("stop", help="stop the RPC server that `start` started")
    _add_ssh_args(b, required=True)
    b.add_argument("--name", default="default")
    b = bsub.add_parser("tunnel", help="hold an SSH forward to the board's RPC server until Ctrl-C")
    _add_ssh_args(b, required=True)
    b.add_argument("--name", default="default", help="attach to this server, or start it (and stop it at the end)")
    b.add_argument("--local-port", type=int, default=0, help="port on this host's 127.0.0.1 (default: any free)")
    b.add_argument("--rpc-tracker", metavar="HOST:PORT", help="register the board at this tracker (reachable here)")
    b.add_argument("--rpc-key", help="the key to register under")
    b = bsub.add_parser("run", help="run a bundle on the board over SSH only (SFTP + runner.py, no RPC)")
    b.add_argument("bundle", type=Path)
    _add_ssh_args(b, required=True)
    b.add_argument("--input", type=Path, help=".npy input (default: the bundle's reference input, checked)")
    b.add_argument("--output", type=Path, help="write the output here (.npy)")
    for b in bsub.choices.values():
        b.set_defaults(func=cmd_board)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what a stopped run prints to resume
    from . import failures
    from .bundle import BundleError
    from .targets import host_cores

    # One place decides the host's thread count: TVM would otherwise use half the logical CPUs.
    os.environ.setdefault("TVM_NUM_THREADS", str(host_cores()))
    # torch.export's pickling warns about its own pytree internals; nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")

    try:
        with failures.tvm_output_held(args.command):
            status = args.func(args)
    except (UserError, BundleError) as e:
        print(f"mnv2-tvm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnv2-tvm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal TVM error in compile or tune: one line naming the full log
        line = failures.report(args, e)
        if line is None:
            raise
        print(f"mnv2-tvm: error: {line}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
