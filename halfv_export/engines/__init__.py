"""Runtime over exported graphs: a `Runner` runs one named graph on numpy feeds, an `EngineTarget` builds engines
and opens runners (ONNX Runtime and TensorRT register themselves), and EnginePipeline does host pre-processing,
prefill and greedy decoding over any Runner."""

from .base import DEFAULT_TARGET, EngineOptions, EngineTarget, Runner, all_targets, get_target, register_target
from .pipeline import EnginePipeline

__all__ = ["DEFAULT_TARGET", "EngineOptions", "EngineTarget", "EnginePipeline", "Runner", "all_targets", "get_target",
           "register_target"]
