"""One causal attention, three ways, on this CPU: the exported plain-op pattern (MatMul, scale, mask Add, Softmax,
MatMul), the same with ONNX Runtime's GroupQueryAttention as the engine stage fuses it (causal=1, the additive mask
as attention_bias, K/V with their own G heads), and torch's SDPA (what the eager reference calls).

    PYTHONPATH=. python tools/attention_micro.py --seq 4160 --heads 14 --kv-heads 2 --head-dim 64

The last sample of the batch is left-padded by a third, so the comparison covers key padding too; the fused
output is checked against the plain one."""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto as T
from onnx import helper as h


def session(nodes, inputs, outputs, initializers=(), threads=2):
    graph = h.make_graph(nodes, "attention", inputs, outputs, list(initializers))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)],
                         ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def best_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4160)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    b, s, H, G, hd = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, H, s, hd), dtype=np.float32)
    k = rng.standard_normal((b, G, s, hd), dtype=np.float32)
    v = rng.standard_normal((b, G, s, hd), dtype=np.float32)
    valid = np.ones((b, s), bool)
    valid[-1, : s // 3] = False
    i = np.arange(s)
    allowed = ((i[None, :] <= i[:, None])[None] & valid[:, None, :]) | (i[None, :] == i[:, None])[None]
    mask = np.where(allowed, 0, -np.inf).astype(np.float32)[:, None]  # what export_forward builds
    scale = hd ** -0.5
    f32 = lambda n, shape: h.make_tensor_value_info(n, T.FLOAT, shape)  # noqa: E731
    plain = session(
        [h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), h.make_node("MatMul", ["q", "kt"], ["s"]),
         h.make_node("Mul", ["s", "scale"], ["s2"]), h.make_node("Add", ["s2", "mask"], ["s3"]),
         h.make_node("Softmax", ["s3"], ["p"], axis=-1), h.make_node("MatMul", ["p", "v"], ["o"]),
         h.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), h.make_node("Reshape", ["ot", "bsd"], ["out"])],
        [f32("q", [b, H, s, hd]), f32("k", [b, H, s, hd]), f32("v", [b, H, s, hd]), f32("mask", [b, 1, s, s])],
        [f32("out", [b, s, H * hd])],
        [h.make_tensor("scale", T.FLOAT, [], [scale]), h.make_tensor("bsd", T.INT64, [3], [b, s, H * hd])], a.threads)
    rep = H // G
    plain_ms, ref = best_ms(lambda: plain.run(None, {"q": q, "k": np.repeat(k, rep, 1), "v": np.repeat(v, rep, 1),
                                                      "mask": mask})[0], a.runs)
    bsd = lambda x: x.transpose(0, 2, 1, 3).reshape(b, s, -1)  # noqa: E731
    gqa = session(
        [h.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total", "", "", "", "mask"],
                     ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=H, kv_num_heads=G,
                     scale=scale, causal=1)],
        [f32("q", [b, s, H * hd]), f32("k", [b, s, G * hd]), f32("v", [b, s, G * hd]),
         h.make_tensor_value_info("seqlens_k", T.INT32, [b]), h.make_tensor_value_info("total", T.INT32, []),
         f32("mask", [b, 1, s, s])],
        [f32("out", [b, s, H * hd]), f32("present_key", None), f32("present_value", None)], threads=a.threads)
    feeds = {"q": bsd(q), "k": bsd(k), "v": bsd(v), "seqlens_k": np.full([b], s - 1, np.int32),
             "total": np.array(s, np.int32), "mask": mask}
    gqa_ms, got = best_ms(lambda: gqa.run(["out"], feeds)[0], a.runs)
    torch.set_num_threads(a.threads)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, np.repeat(k, rep, 1), np.repeat(v, rep, 1)))
    tm = torch.from_numpy(mask)
    sdpa_ms, _ = best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm,
                                                                                  scale=scale), a.runs)
    print(f"batch {b}, seq {s}, heads {H}/{G}, head_dim {hd}, {a.threads} threads, best of {a.runs}")
    print(f"plain ONNX ops (exported)          {plain_ms:9.1f} ms")
    print(f"GroupQueryAttention (engine stage) {gqa_ms:9.1f} ms  {plain_ms / gqa_ms:.2f}x  "
          f"max |diff| {np.abs(got - ref).max():.1e}")
    print(f"torch SDPA with the same mask      {sdpa_ms:9.1f} ms")


if __name__ == "__main__":
    main()
