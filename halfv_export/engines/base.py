"""What every engine target provides, and the registry the pipeline finds targets in.

A target is one module that builds engines from an artifacts folder and opens a `Runner` over them; it registers
itself with one `register_target(EngineTarget(...))` line. The pipeline, the CLI and the generation loop only ever
call `get_target(name)`, so adding a target (OpenVINO, torch AOTInductor, ...) edits no switch anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from ..base.errors import BadInput

DEFAULT_TARGET = "onnxruntime"


@runtime_checkable
class Runner(Protocol):
    """Runs the named graphs of one artifacts folder. `run` takes and returns host arrays keyed by the graph's
    input/output names (feeds a graph does not declare are ignored); `runs_bf16` says whether bf16 artifacts can
    run at all; `describe` is the one-line device description that reports carry."""

    runs_bf16: bool

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class EngineOptions:
    """What `engine`, `run` and `validate` hand a target; each target reads the fields it knows.

    ep: ONNX Runtime execution provider (cpu, cuda, tensorrt). plan: static-shape profile ranges for targets that
    compile ahead of time (TensorRT's PlanOptions; None = that target's defaults)."""

    ep: str = "cpu"
    threads: int | None = None
    plan: Any = None


@dataclass(frozen=True)
class EngineTarget:
    name: str
    engine_dir: str  # sub-folder of the artifacts the engines go into (ort/, trt/)
    build: Callable[[Path, EngineOptions, Callable[[str], None]], dict]  # the engine stage -> engine.json content
    open: Callable[[Path, EngineOptions], Runner]  # a runner over the artifacts (built engines where they exist)
    manifest_extra: Callable[[Path, EngineOptions], dict] | None = None  # recorded in manifest.json at export
    summary: str = ""  # one line for --help


TARGETS: dict[str, EngineTarget] = {}


def register_target(target: EngineTarget) -> EngineTarget:
    TARGETS[target.name] = target
    return target


def _register_builtin() -> None:
    from . import ort, trt  # noqa: F401  (each registers itself; TensorRT itself is imported lazily)


def get_target(name: str) -> EngineTarget:
    _register_builtin()
    if name not in TARGETS:
        raise BadInput(f"unknown target '{name}'; choose one of: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def all_targets() -> list[EngineTarget]:
    _register_builtin()
    return [TARGETS[name] for name in sorted(TARGETS)]
