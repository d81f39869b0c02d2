"""Shared fixtures. Bundles are compiled once per session: compiling is the slow part."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests time nothing; pin TVM's thread pool so two pytest workers would not oversubscribe.
os.environ.setdefault("TVM_NUM_THREADS", "2")

sys.path.insert(0, str(Path(__file__).parent))
from board_fixture import *  # noqa: E402,F401,F403  (virtual board fixtures)

# Small configurations of each model: quick to compile, same graph structure as the full ones.
SMALL = {
    "mobilenet_v2": dict(model="mobilenet_v2", width=0.35, resolution=96),
    "ssdlite": dict(model="ssdlite", width=0.35, resolution=128),
    "deeplabv3": dict(model="deeplabv3", width=0.35, resolution=129),
}


@pytest.fixture(scope="session")
def host_bundles(tmp_path_factory):
    """One untuned host bundle per model (torch frontend), compiled on first use."""
    from mnv2_tvm import targets
    from mnv2_tvm.compile import compile_bundle
    from mnv2_tvm.models import ModelConfig

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("bundles")

    def get(model: str) -> Path:
        if model not in built:
            cfg = ModelConfig(**SMALL[model])
            out = root / model
            compile_bundle(cfg, targets.load("host"), out, records_dir=root / "no-records")
            built[model] = out
        return built[model]

    return get
