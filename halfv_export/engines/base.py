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
from .arrays import NUMPY

DEFAULT_TARGET = "onnxruntime"


@runtime_checkable
class ArrayOps(Protocol):
    """The array type a runner's `run` takes and returns, and the few operations EnginePipeline needs between
    graphs, so that tensors stay where the runner keeps them (engines/arrays.py: host numpy for ONNX Runtime,
    torch CUDA tensors for TensorRT). Dtypes are named as torch and numpy spell them ("int64", "bfloat16")."""

    def asarray(self, host: Any, dtype: str | None = None) -> Any: ...  # host numpy / torch -> runner array

    def to_host(self, array: Any) -> np.ndarray: ...  # for the host's own use (bfloat16 widened to float32)

    def concat(self, arrays: list, axis: int) -> Any: ...

    def ones(self, shape: tuple, like: Any) -> Any: ...  # dtype (and device) of `like`

    def argmax(self, array: Any, axis: int) -> Any: ...  # int64


@runtime_checkable
class Runner(Protocol):
    """Runs the named graphs of one artifacts folder.

    run(graph, feeds) -> outputs: arrays keyed by the graph's input/output names (feeds a graph does not declare are
        ignored). Feeds carry the dtype the graph declares; a mismatch is refused, never reinterpreted (TensorRT
        casts integer feeds where no value changes).
    runs_bf16: whether bf16 artifacts can run at all.
    describe(): the one-line device description that reports carry.
    arrays (optional): the ArrayOps of the array type `run` returns and takes without copying (TensorRT: torch
        tensors on its GPU), so EnginePipeline keeps embeds and the K/V cache there between graphs; host numpy
        arrays are always accepted as feeds. A runner without it takes and returns numpy (arrays_of -> NUMPY)."""

    runs_bf16: bool

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]: ...

    def describe(self) -> str: ...


def arrays_of(runner: Runner) -> ArrayOps:
    """The array namespace a runner works in: its `arrays`, or numpy where it declares none."""
    return getattr(runner, "arrays", None) or NUMPY


@dataclass(frozen=True)
class EngineOptions:
    """What `engine`, `run` and `validate` hand a target; each target reads the fields it knows.

    ep: ONNX Runtime execution provider (cpu, cuda, tensorrt). plan: static-shape profile ranges for targets that
    compile ahead of time (TensorRT's PlanOptions; None = that target's defaults). fuse_attention: let a target
    replace the plain-op causal attention of prefill graphs by its fused kernel (ONNX Runtime CPU:
    engines/ort_fusion.py); False keeps the exported graphs exactly as written."""

    ep: str = "cpu"
    threads: int | None = None
    plan: Any = None
    fuse_attention: bool = True


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
