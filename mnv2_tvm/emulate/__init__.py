"""ARM cost without a board: a deterministic emulated-core cost.

Candidates and whole models run as real aarch64 (or x86-64) code under qemu-user, inside a
long-lived guest process; our TCG plugin (``plugin/mnv2cost.c``) counts what they execute —
instructions retired by class, per thread and per parallel region, and data accesses through a
simulated cache hierarchy — and a model of the board's core (``[core]`` in the target's TOML,
``core_model.py``) turns the counts into cycles and milliseconds. The same candidate gets a
bit-identical cost whatever the host's load.

    from mnv2_tvm.emulate import EmulatedCore
    with EmulatedCore("rpi4b", threads=1) as core:
        cost = core.measure("kernel.so", "vadd", [((4096,), "float32")] * 3)
        print(cost.summary())

Set-up: ``bash scripts/setup_emulator.sh`` (qemu-user, the plugin) and, for aarch64 guests, the
virtual board's userland (``python3 scripts/virtual_board.py setup``).
"""

from .core_model import CoreModel, load_core_model
from .runner import EmulatedCore, EmulatedCost, EmulatorError, ThreadCost, cost_from_record

__all__ = ["CoreModel", "EmulatedCore", "EmulatedCost", "EmulatorError", "ThreadCost", "cost_from_record",
           "load_core_model"]
