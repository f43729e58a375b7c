"""The files an artifacts folder holds, by name: the graph kinds (graphs/specs.py builds them), the shared weights
and their index, the engine folders. Torch-free, so the runtime install (engines/, host/) opens a build without the
toolchain that wrote it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights.bin"
WEIGHTS_INDEX = "weights.json"
ORT_DIR = "ort"  # the ONNX Runtime engine stage's output (engine.json, fused graphs)
TRT_DIR = "trt"  # TensorRT plans

# ONNX element types (TensorProto.DataType numbers) -> the numpy dtype weights.bin stores them as; bfloat16 as its
# raw 16-bit pattern. Spelled out so that reading weights.bin needs no onnx package (tests/test_runtime_install.py
# holds it equal to onnx.helper.tensor_dtype_to_np_dtype); graphs/shared_weights.py writes with the same table.
ONNX_BFLOAT16 = 16
NUMPY_BY_ONNX = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, ONNX_BFLOAT16: np.uint16}


@dataclass(frozen=True)
class GraphKind:
    name: str
    pattern: str  # file name, with {label} for per-bucket graphs
    weights: str  # which weights the graph holds: "embed" | "vision" | "llm"

    def holds(self, file: str) -> bool:
        """Whether `file` is a graph of this kind: vision_448x448.onnx is VISION's; prefill_full.onnx is
        PREFILL_FULL's, not PREFILL's (a per-bucket label is HxW)."""
        head, label, tail = self.pattern.partition("{label}")
        if not label:
            return file == self.pattern
        return re.fullmatch(re.escape(head) + r"\d+x\d+" + re.escape(tail), file) is not None

    def file(self, label: str | tuple[int, int] | None = None) -> str:
        if "{label}" not in self.pattern:
            return self.pattern
        if label is None:
            raise ValueError(f"graph kind {self.name} is per bucket; give its bucket")
        return self.pattern.format(label=bucket_label(label) if isinstance(label, tuple) else label)


EMBED = GraphKind("embed", "embed.onnx", "embed")
VISION = GraphKind("vision", "vision_{label}.onnx", "vision")
VISION_FULL = GraphKind("vision_full", "vision_full_{label}.onnx", "vision")  # a cut build's uncut tower (--full)
TOWERS = (VISION, VISION_FULL)
PREFILL = GraphKind("prefill", "prefill_{label}.onnx", "llm")
PREFILL_FULL = GraphKind("prefill_full", "prefill_full.onnx", "llm")
DECODE = GraphKind("decode", "decode.onnx", "llm")
DECODE_FULL = GraphKind("decode_full", "decode_full.onnx", "llm")
SELECTION = GraphKind("selection", "selection_{label}.onnx", "llm")
PREFILL_INPUTS = ["embeds", "attention_mask", "positions", "visual_start"]


def bucket_label(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def is_tower(file: str) -> bool:
    """Whether `file` is a vision graph: a bucket's tower, or a cut build's uncut one."""
    return any(kind.holds(file) for kind in TOWERS)


def bucket_of(file: str) -> str | None:
    """The HxW label of a per-bucket graph file (vision_full_448x448.onnx -> 448x448); None for the others."""
    found = re.search(r"_(\d+x\d+)\.onnx$", file)
    return found.group(1) if found else None


def read_index(directory: Path) -> dict | None:
    """weights.json (graphs/shared_weights.py writes it): tensor name -> dtype, shape, offset, length in weights.bin."""
    path = Path(directory) / WEIGHTS_INDEX
    if not path.exists():
        return None
    return json.loads(path.read_text())
