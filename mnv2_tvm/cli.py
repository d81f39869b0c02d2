"""``mnv2-tvm``: argument parsing only; each subcommand calls one function of the package.

Verbs and flags follow the retired ``tvmc`` (tune / compile / run, --target, --rpc-tracker,
--rpc-key, --tuning-records) so TVM users feel at home.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import MODELS

    p.add_argument("model", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (0.35 0.5 0.75 1.0 1.3 1.4)")
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

    host = targets.host_target_name()
    for name in targets.available():
        spec = targets.load(name)
        print(("* " if name == host else "  ") + spec.summary())
    print("(* = this host; `--target host` picks it)")


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
    records = args.tuning_records if args.tuning_records is not None else spec.records_dir
    out = args.output or Path("build") / f"{cfg.label}-{spec.name}"
    result = compile_bundle(cfg, spec, out, frontend=args.frontend, records_dir=records,
                            weights=args.weights, seed=args.seed)
    m, s = result.manifest, result.seconds
    tuned = len(m["tuning"]["tuned"])
    total = tuned + len(m["tuning"]["fallback"])
    print(f"{cfg.label} for {spec.name} ({m['arch']}): {result.bundle_dir}/  "
          f"[{m['madds'] / 1e6:,.0f}M MAdds, {m['params'] / 1e6:.2f}M params, {tuned}/{total} tasks tuned; "
          f"lower {s['lower']:.1f} s, build {s['build']:.1f} s, link {s['link']:.1f} s]")
    if spec.device_kind == "opencl":
        print("note: OpenCL kernels are embedded in the library; no OpenCL device here can run them")


def _tracker(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--rpc-tracker takes HOST:PORT, not {value!r}")
    return host, int(port)


def cmd_tune(args: argparse.Namespace) -> None:
    if args.trials <= 0:
        raise UserError(f"--trials must be positive, not {args.trials}")
    from . import targets
    from .tune import tune_model

    spec = targets.load(args.target)
    tracker = _tracker(args.rpc_tracker)
    if tracker is None and not spec.is_host:
        raise UserError(f"target {spec.name} is not this machine: measure on the board with "
                        f"--rpc-tracker HOST:PORT --rpc-key {spec.rpc_key}")
    records = args.tuning_records if args.tuning_records is not None else spec.records_dir
    tune_model(_config(args), spec, records, args.trials, frontend=args.frontend, weights=args.weights,
               tracker=tracker, rpc_key=args.rpc_key or spec.rpc_key, seed=args.seed)


def cmd_run(args: argparse.Namespace) -> None:
    from .run import run_bundle

    run_bundle(args.bundle, image=args.input, save=args.save, time_it=args.time, top=args.top)


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
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="run a bundle on this machine")
    p.add_argument("bundle", type=Path)
    p.add_argument("--input", type=Path, help="an image (default: the bundle's fixed random input)")
    p.add_argument("--save", type=Path, help="PNG of the mask (deeplabv3) or the boxes (ssdlite)")
    p.add_argument("--time", action="store_true", help="also time it (median of 5 repeats)")
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .bundle import BundleError

    try:
        args.func(args)
    except (UserError, BundleError) as e:
        print(f"mnv2-tvm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnv2-tvm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
