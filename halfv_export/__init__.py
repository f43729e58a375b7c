"""halfv-export: HalfV visual-token pruning baked into deployable VLM engines.

Subpackages; imports only point down (exporter -> validate -> engines -> graphs -> base):
  exporter/  the CLI, the stage functions it calls (pipeline), calibration driver, schedule I/O, the export stage
  validate/  FLOPs model, parity/fidelity/latency measurement, reports, plots, bench
  engines/   the Runner protocol, the engine-target registry (ONNX Runtime, TensorRT), generation over graphs
  graphs/    backbone adapters, graph specs, the eager HalfV reference, pruning ops, TME probes, ONNX export + lint
  base/      one-line errors, atomic artifact I/O, manifest, staged builds, data loading
"""

from .base.version import VERSION as __version__  # noqa: F401
