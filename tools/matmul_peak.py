"""What one large fp32 MatMul reaches on this machine, in ONNX Runtime and in torch: the ceiling a prefill graph's
GFLOP/s is read against (bench reports the graph's time; its FLOPs are measure.flops').

    PYTHONPATH=. python tools/matmul_peak.py --m 1088 --k 896 --n 4864 --threads 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from attention_micro import best_ms, session  # the same session options and timing as the attention micro-bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=1088)
    parser.add_argument("--k", type=int, default=896)
    parser.add_argument("--n", type=int, default=4864)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    m, k, n = args.m, args.k, args.n
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
    ort_session = session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "w")], threads=args.threads)
    torch.set_num_threads(args.threads)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    flops = 2 * m * k * n
    # best_ms warms up first: ONNX Runtime pre-packs the constant weight on the first run
    for name, fn in (("onnxruntime", lambda: ort_session.run(None, {"x": x})), ("torch", lambda: xt @ wt)):
        ms, _ = best_ms(fn, args.runs)
        print(f"{name:12s} [{m}, {k}] x [{k}, {n}]  {ms:8.2f} ms  {flops / ms / 1e6:6.1f} GFLOP/s "
              f"(best of {args.runs}, {args.threads} threads)")


if __name__ == "__main__":
    main()
