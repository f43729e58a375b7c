"""halfv-export: HalfV visual-token pruning baked into deployable VLM engines.

The library the CLI mirrors (each returns a typed result, prints nothing, and reports progress through an
optional callback):

    calibrate(backbone, out) -> Calibration      schedule.json (+ tme.png)
    export(schedule, out) -> Artifacts           ONNX graphs, weights.bin, artifacts.json, manifest.json
    engine(artifacts) -> Engines                 ONNX Runtime (or TensorRT) engines for this machine
    validate(artifacts) -> Report                parity / accuracy / latency against the eager reference
    build(backbone, out) -> Build                all four, gated, replacing `out` only when they pass
    load(artifacts) -> Model                     generation over a build

Rooms; imports only point down (tests/test_layout.py):
  cli/          the Click commands: parse options, call the stages, render results
  training/     the training that makes the shipped embedded defaults (python -m halfv_export.training)
  serving/      the OpenAI-compatible HTTP server and its continuous batcher
  stages/       the library functions above, their options, results and progress events
  benchmarks/   bench: timings of exported graphs vs eager at published model shapes
  calibration/  TME / KL probes and the rules that read them, the FLOPs-budget search, schedule.json
  measure/      FLOPs model, parity / fidelity / accuracy / latency measurement, reports and plots
  engines/      runners over exported graphs (ONNX Runtime, TensorRT), the generation pipeline, load()
  graphs/       backbone adapters, graph specs, the eager HalfV reference, pruning ops, ONNX export + lint
  tasks/        the digit tasks (grids and pages of real scans) the defaults are trained and judged on
  host/         host-side inputs (pixels, positions, chat template, token ids) without torch or transformers
  base/         one-line errors, atomic I/O, manifest, staged builds, data loading, the enums files carry
"""

from .base.version import VERSION as __version__  # noqa: F401

# name -> the module that defines it, imported on first use: `import halfv_export` stays cheap (no torch, no ONNX
# Runtime) for tools that only read the version
_API = {
    "load": "engines.api", "Model": "engines.api", "Completion": "engines.api", "Piece": "engines.api",
    "EngineOptions": "engines.base",
    "calibrate": "stages.calibrate", "Probes": "stages.calibrate", "Search": "stages.calibrate",
    "export": "stages.export", "engine": "stages.engine", "validate": "stages.validate",
    "lint": "stages.export", "build": "stages.build", "BuildFailed": "stages.build",
    "EngineStageFailed": "stages.build", "make_task": "stages.data", "TaskSet": "stages.data",
    "compare": "stages.compare", "flops_table": "stages.flops",
    "Calibration": "stages.results", "Artifacts": "stages.results", "Engines": "stages.results",
    "Report": "stages.results", "Build": "stages.results", "Choice": "calibration.schedule",
    "ChosenBy": "calibration.schedule", "SSRMode": "base.kinds", "RatioKind": "base.kinds",
    "ProgressEvent": "stages.progress", "Stage": "stages.progress",
    "HalfvError": "base.errors", "BadInput": "base.errors",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'halfv_export' has no attribute '{name}'")
