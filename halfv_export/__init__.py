"""halfv-export: HalfV visual-token pruning baked into deployable VLM engines.

Subpackages, one per stage:
  graphs/    backbone adapters, the eager HalfV reference, pruning ops, TME probes
  exporter/  the CLI, calibration driver and schedule I/O
  engines/   runtime sessions (ONNX Runtime, TensorRT) and generation over them
  validate/  FLOPs model, parity/fidelity/latency measurement, reports and plots
"""

__version__ = "0.1.0"
