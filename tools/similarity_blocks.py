"""The farthest-point fill's similarity matrix in ONNX Runtime: one MatMul F·Fᵀ against pruning.similarity (4 x 4 row
blocks, the lower ones transposed from the upper), both exported by the product's own exporter, same input.

    PYTHONPATH=. python tools/similarity_blocks.py --n 4096 --dim 896
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from attention_micro import best_ms  # the same timing as the other micro-benches
from halfv_export.graphs.onnx_export import export_module
from halfv_export.graphs.pruning import similarity


class OneMatMul(torch.nn.Module):
    def forward(self, features):
        return features @ features.transpose(1, 2)


class Blocked(torch.nn.Module):
    def forward(self, features):
        return similarity(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    features = F.normalize(torch.randn(1, args.n, args.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name, module in (("one MatMul", OneMatMul()), ("4x4 blocks", Blocked())):
            path = export_module(module, (features,), Path(work) / f"{name[:3]}.onnx", ["features"], ["similarity"],
                                 None)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            ms, out = best_ms(lambda: session.run(None, {"features": features.numpy()})[0], args.runs)
            results[name] = out
            print(f"{name:11s} [{args.n}, {args.dim}]  best of {args.runs}: {ms:7.1f} ms")
    a, b = results.values()
    print(f"max |difference| {float(np.abs(a - b).max()):.3g}; blocked exactly symmetric: {bool((b == b.transpose(0, 2, 1)).all())}")


if __name__ == "__main__":
    main()
