"""halfv-export: HalfV visual-token pruning baked into deployable VLM engines.

Subpackages; imports only point down (exporter -> validate -> engines -> graphs -> base):
  exporter/  the CLI, the stage functions it calls (pipeline), calibration driver, schedule I/O, the export stage
  validate/  FLOPs model, parity/fidelity/latency measurement, reports, plots, bench
  engines/   the Runner protocol, the engine-target registry (ONNX Runtime, TensorRT), generation over graphs
  graphs/    backbone adapters, graph specs, the eager HalfV reference, pruning ops, TME probes, ONNX export + lint
  base/      one-line errors, atomic artifact I/O, manifest, staged builds, data loading
"""

from .base.version import VERSION as __version__  # noqa: F401

_API = ("load", "Model", "Completion", "Piece")
__all__ = ["load", "Model", "Completion", "Piece", "__version__"]


def __getattr__(name: str):
    """`halfv_export.load` and its result types, imported on first use: `import halfv_export` stays cheap (no torch,
    no ONNX Runtime) for tools that only read the version."""
    if name in _API:
        from .engines import api

        return getattr(api, name)
    raise AttributeError(f"module 'halfv_export' has no attribute '{name}'")
