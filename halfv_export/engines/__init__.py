"""Runtime over exported graphs: a Runner runs one named graph on numpy feeds (ONNX Runtime now, TensorRT behind
the same interface later) and EnginePipeline does host pre-processing, prefill and greedy decoding over a Runner."""

from .ort import OrtRunner, build_ort_engines
from .pipeline import EnginePipeline

__all__ = ["EnginePipeline", "OrtRunner", "build_ort_engines"]
