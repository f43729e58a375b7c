"""Fused causal attention for ONNX Runtime's CPU provider.

The exported graphs write attention out in plain ONNX ops (TensorRT-clean): scores [B, H, S, S] = Q·Kᵀ, scale, add
the mask, Softmax, ·V. ONNX Runtime runs that as five full passes over S² floats per head, every one of them over
the upper triangle the mask throws away. At a few thousand visual tokens the prefill's first layers (before the IVR
cut) are dominated by it. The ONNX Runtime engine stage therefore rewrites each causal self-attention of a prefill
graph into one com.microsoft::GroupQueryAttention node (ORT's own kernel, the one onnxruntime-genai runs on CPU):

- causal=1: the kernel computes the lower triangle only (about half the score work), in one pass per head.
- attention_bias = the graph's own additive mask, unchanged. Our mask is causal already (plus key padding and an
  always-open diagonal, export_forward / halfv.additive_mask), so causal ∧ mask = mask: the fused node attends to
  exactly the keys the plain graph does. GQA's own padding input is not used (seqlens_k = S - 1 for every row).
- K and V go in with their G key/value heads, not the repeat_interleave'd H: GQA broadcasts the groups itself.

Which attentions are causal self-attention is not guessed from the op pattern alone: the exporter runs exactly those
through `export_forward.CausalSelfAttention`, and torch.onnx records the module class on every node it emits
(node metadata `pkg.torch.onnx.class_hierarchy`). Frozen SSR layers (queries are a subset of the rows), decode
steps and vision towers never carry the mark. A marked site must also match the exact fp32 op pattern and have
static head counts in the graph's value_info, or it is left as is, so an older export simply runs unfused.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

MARK = "CausalSelfAttention"
HIERARCHY = "pkg.torch.onnx.class_hierarchy"


def _marked(node: onnx.NodeProto) -> bool:
    return any(p.key == HIERARCHY and MARK in p.value for p in node.metadata_props)


def _heads(value_info: dict, name: str) -> int | None:
    """dim 1 of a [B, heads, S, hd] tensor when the exporter recorded it as a number."""
    info = value_info.get(name)
    dims = info.type.tensor_type.shape.dim if info is not None else []
    return dims[1].dim_value if len(dims) == 4 and dims[1].HasField("dim_value") else None


class _Graph:
    """Producer / consumer lookups over one GraphProto."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.value_info = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
        self.constants = {i.name: i for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant":
                self.constants[n.output[0]] = n.attribute[0].t

    def only_consumer(self, name: str, op: str):
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op and name not in self.outputs:
            return users[0]
        return None

    def made_by(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def scalar(self, name: str) -> float | None:
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        values = onnx.numpy_helper.to_array(tensor).reshape(-1)
        return float(values[0]) if values.size == 1 else None

    def unrepeated(self, name: str) -> str:
        """The tensor before torch's repeat_interleave(groups, dim=1) (Unsqueeze -> Expand -> Reshape), or `name`
        itself when there is no such chain (groups == 1)."""
        reshape = self.made_by(name, "Reshape")
        expand = reshape is not None and self.made_by(reshape.input[0], "Expand")
        unsqueeze = expand and self.made_by(expand.input[0], "Unsqueeze")
        return unsqueeze.input[0] if unsqueeze else name


def _match(g: _Graph, softmax: onnx.NodeProto) -> dict | None:
    """softmax -> the plain attention around it, or None when anything differs from what attend() exports."""
    if not _marked(softmax):
        return None
    add = g.made_by(softmax.input[0], "Add")
    mul = add and g.made_by(add.input[0], "Mul")
    scores = mul and g.made_by(mul.input[0], "MatMul")
    key_t = scores and g.made_by(scores.input[1], "Transpose")
    weighted = g.only_consumer(softmax.output[0], "MatMul")
    back = weighted and g.only_consumer(weighted.output[0], "Transpose")
    merged = back and g.only_consumer(back.output[0], "Reshape")
    if not (key_t and merged) or weighted.input[0] != softmax.output[0]:
        return None
    if list(helper.get_attribute_value(key_t.attribute[0])) != [0, 1, 3, 2]:
        return None
    if list(helper.get_attribute_value(back.attribute[0])) != [0, 2, 1, 3]:
        return None
    scale = g.scalar(mul.input[1])
    q, k, v = scores.input[0], g.unrepeated(key_t.input[0]), g.unrepeated(weighted.input[1])
    heads, kv_heads = _heads(g.value_info, q), _heads(g.value_info, k)
    if scale is None or heads is None or kv_heads is None or _heads(g.value_info, v) != kv_heads:
        return None
    if heads % kv_heads or (kv_heads != heads and k == key_t.input[0]):
        return None
    return {"q": q, "k": k, "v": v, "mask": add.input[1], "scale": scale, "heads": heads, "kv_heads": kv_heads,
            "out": merged.output[0], "at": merged, "removed": [key_t, scores, mul, add, softmax, weighted, back, merged]}


def _gqa_nodes(site: dict, tag: str) -> list[onnx.NodeProto]:
    """[B, H, S, hd] q and [B, G, S, hd] k/v -> one causal GroupQueryAttention writing site['out'] [B, S, H*hd]."""
    n = lambda *a, **kw: helper.make_node(*a, **kw)  # noqa: E731
    p = f"{tag}/"
    nodes = [n("Constant", [], [p + "bsd"], value=helper.make_tensor(p + "bsd", TensorProto.INT64, [3], [0, 0, -1])),
             n("Constant", [], [p + "two"], value=helper.make_tensor(p + "two", TensorProto.INT64, [], [2])),
             n("Constant", [], [p + "zero"], value=helper.make_tensor(p + "zero", TensorProto.INT64, [1], [0])),
             n("Constant", [], [p + "one"], value=helper.make_tensor(p + "one", TensorProto.INT64, [], [1]))]
    for name in ("q", "k", "v"):
        nodes += [n("Transpose", [site[name]], [p + name + "_bshd"], perm=[0, 2, 1, 3]),
                  n("Reshape", [p + name + "_bshd", p + "bsd"], [p + name + "_bsd"])]
    nodes += [n("Shape", [site["q"]], [p + "shape"]),
              n("Gather", [p + "shape", p + "two"], [p + "s"]),
              n("Gather", [p + "shape", p + "zero"], [p + "b"]),
              n("Cast", [p + "s"], [p + "total"], to=TensorProto.INT32),
              n("Sub", [p + "s", p + "one"], [p + "last"]),
              n("Cast", [p + "last"], [p + "last32"], to=TensorProto.INT32),
              n("Expand", [p + "last32", p + "b"], [p + "seqlens_k"]),
              n("GroupQueryAttention",
                [p + "q_bsd", p + "k_bsd", p + "v_bsd", "", "", p + "seqlens_k", p + "total", "", "", "", site["mask"]],
                [site["out"], p + "present_key", p + "present_value"], domain="com.microsoft", name=tag,
                num_heads=site["heads"], kv_num_heads=site["kv_heads"], scale=site["scale"], causal=1)]
    return nodes


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (the repeat_interleave chains the fused nodes no longer read)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [i for i, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        if not dead:
            return
        for i in reversed(dead):
            del graph.node[i]


def fuse_causal_attention(model: onnx.ModelProto) -> int:
    """Rewrite every marked causal self-attention of `model` (in place) into GroupQueryAttention; returns how many."""
    g = _Graph(model.graph)
    sites = [s for s in (_match(g, n) for n in model.graph.node if n.op_type == "Softmax") if s is not None]
    if not sites:
        return 0
    removed = {id(n) for s in sites for n in s["removed"]}
    replacement = {id(s["at"]): _gqa_nodes(s, f"halfv_fused_attention_{i}") for i, s in enumerate(sites)}
    nodes = []
    for node in model.graph.node:  # each fused group goes where its last node was: all its inputs exist by then
        nodes += replacement.get(id(node), [])
        if id(node) not in removed:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_dead(model.graph)
    produced = {o for n in model.graph.node for o in n.output}
    kept_info = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(sites)
