"""HalfV's selection against a plain transcription of the paper's rule (method notes §4-§5, §8 interpretation).

The oracle below is written from the formulas, in float64 numpy, and calls none of halfv_export's scoring, fill,
budget, RoPE, norm or gather helpers. It reads only the model's weights and the hidden states of the model's own
(transformers) forward, recorded with forward pre-hooks; for SSR it compacts the sequence itself and runs the model's
decoder layers L1 .. L2-2 over it.

    IVR (before layer L1)
        x = RMSNorm_{L1-1}(h_{L1-1});  q = Wq x[last] + bq;  k_v = Wk x[s+v] + bk  (v < N; kv head g = head // (H/G))
        score[v] = mean_heads softmax_v(q_head . k_v)               NO RoPE, NO 1/sqrt(hd)
        anchors = top-A scores (ties -> lower index);  F = unit rows of finalRMSNorm(h_{L1})[s:s+N]
        greedy max-min fill with dist = 1 - <F_u, F_v> up to K1 (argmax -> lowest index on ties)
    SSR top-K (before layer L2), on the IVR-compacted sequence at the kept rows' original M-RoPE positions
        same score with M-RoPE on q and k, keys = the K1 kept visual rows only (the slicing fix), top-K2, K2 = N*sigma

The reference (HalfVReference, fp32) must keep exactly the oracle's index sets. Three negative controls, each a
variant of the oracle, must disagree with it on at least one case, so the comparison can tell these mistakes apart:
RoPE applied for IVR, 1/sqrt(head_dim) applied to the logits, and the authors' unfixed SSR key slice [s, s+N).
The exported selection graph (the prefill's selection code path, traced) is compared in ONNX Runtime as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from halfv_export.tasks.digits import task_set
from halfv_export.graphs.export_forward import SelectionGraph
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from tests.conftest import make_image

KEEP, ANCHOR, SSR_RATIO, SSR_LAYER = 0.25, 0.1, 0.05, 6  # the paper's Qwen ratios; L2 = 21/28 of 8 layers
IVR_LAYERS = (1, 2)


def schedule(ivr_layer: int) -> PruneSchedule:
    return PruneSchedule(ivr_layer, KEEP, ANCHOR, SSR_LAYER, "topk", SSR_RATIO)


# ------------------------------------------------------------------------------------------------ the oracle
@dataclass(frozen=True)
class Variant:
    """The paper's rule (all False), or one deliberate mistake (the negative controls)."""

    ivr_rope: bool = False  # apply M-RoPE to the IVR scores
    scaled: bool = False  # multiply every score logit by 1/sqrt(head_dim)
    unfixed_slice: bool = False  # SSR keys = rows [s, s+N) of the compacted sequence (the authors' bug)


PAPER = Variant()


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def rms_norm(x: np.ndarray, norm) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + norm.variance_epsilon) * f64(norm.weight)


def mrope(positions: np.ndarray, head_dim: int, theta: float, section: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """positions [3, R] (temporal, height, width) -> cos, sin [R, head_dim]: frequency j turns with the position
    component its section names (the first section[0] frequencies with t, the next section[1] with h, the rest w)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    component = np.repeat([0, 1, 2], section)
    angle = np.stack([positions[component[j]] * inv_freq[j] for j in range(head_dim // 2)], axis=-1)
    return np.concatenate([np.cos(angle)] * 2, -1), np.concatenate([np.sin(angle)] * 2, -1)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def relevance(model, layer_index: int, h: np.ndarray, key_rows: np.ndarray, positions: np.ndarray | None,
              scaled: bool) -> np.ndarray:
    """mean over heads of softmax over key_rows of q_last . k (RoPE when positions [3, S] is given). h [S, D]."""
    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    hd = text.hidden_size // heads
    layer = model.model.language_model.layers[layer_index]
    attn = layer.self_attn
    x = rms_norm(h, layer.input_layernorm)
    q = (x[-1] @ f64(attn.q_proj.weight).T + f64(attn.q_proj.bias)).reshape(heads, hd)
    k = (x[key_rows] @ f64(attn.k_proj.weight).T + f64(attn.k_proj.bias)).reshape(len(key_rows), kv_heads, hd)
    if positions is not None:
        rope = dict(head_dim=hd, theta=text.rope_parameters["rope_theta"],
                    section=text.rope_parameters["mrope_section"])
        q = rotate(q, *mrope(positions[:, -1:], **rope))
        cos, sin = mrope(positions[:, key_rows], **rope)
        k = rotate(k, cos[:, None], sin[:, None])
    score = np.zeros(len(key_rows))
    for head in range(heads):
        logits = k[:, head // (heads // kv_heads)] @ q[head] * (1 / math.sqrt(hd) if scaled else 1.0)
        weights = np.exp(logits - logits.max())
        score += weights / weights.sum() / heads
    return score


def top(scores: np.ndarray, k: int, margins: list | None = None) -> list[int]:
    """The k largest, ties to the lower index, ascending. `margins` gets (k-th - (k+1)-th) / k-th score."""
    order = np.argsort(-scores, kind="stable")
    if margins is not None and 0 < k < len(scores):
        margins.append((scores[order[k - 1]] - scores[order[k]]) / scores[order[k - 1]])
    return sorted(order[:k].tolist())


def farthest_points(features: np.ndarray, anchors: list[int], k: int, margins: list | None = None) -> list[int]:
    """Greedy max-min farthest-point sampling from the anchors, cosine distance, lowest index on ties. `margins` gets
    each step's lead of the pick over the runner-up."""
    dist = 1.0 - features @ features.T
    chosen = list(anchors)
    while len(chosen) < k:
        md = dist[:, chosen].min(axis=1) if chosen else np.full(len(features), 2.0)
        md[chosen] = -np.inf
        if margins is not None:
            margins.append(float(np.diff(np.sort(md)[-2:])[0]))
        chosen.append(int(np.argmax(md)))
    return sorted(chosen)


def layer_inputs(model, inputs) -> dict[int, np.ndarray]:
    """The input hidden state of every decoder layer in the model's own forward (one sample, unpadded): [S, D]."""
    lm = model.model.language_model
    seen = {}

    def hook(index):
        return lambda module, args, kwargs: seen.__setitem__(index, (args[0] if args else kwargs["hidden_states"])[0])

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            lm(inputs_embeds=inputs.embeds, position_ids=inputs.positions, attention_mask=inputs.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return {i: f64(h) for i, h in seen.items()}


def compacted_input(model, h: np.ndarray, positions: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Run the model's decoder layers first .. stop-1 over an already compacted sequence h [S1, D] at its rows'
    original M-RoPE positions [3, S1], causal: the input of layer `stop`."""
    text = model.config.text_config
    hd = text.hidden_size // text.num_attention_heads
    cos, sin = mrope(positions, hd, text.rope_parameters["rope_theta"], text.rope_parameters["mrope_section"])
    x = torch.tensor(h, dtype=torch.float32)[None]
    rope = (torch.tensor(cos, dtype=torch.float32)[None], torch.tensor(sin, dtype=torch.float32)[None])
    rows = x.shape[1]
    mask = torch.triu(torch.full((rows, rows), torch.finfo(torch.float32).min), diagonal=1)[None, None]
    with torch.no_grad():
        for i in range(first, stop):
            x = model.model.language_model.layers[i](x, attention_mask=mask, position_embeddings=rope)
    return f64(x[0])


def oracle(model, case, ivr_layer: int, variant: Variant = PAPER, margins: list | None = None) -> tuple[list, list]:
    """(IVR kept, SSR kept): original visual indices, ascending. A text row picked by the unfixed slice appears as
    ("text", row) in the SSR set. `margins` gets every decision's lead over the runner-up (how close to a tie)."""
    hs, positions, s, n = case.hidden, case.positions, case.start, case.n
    k1 = int(n * KEEP)
    anchors, k2 = int(k1 * ANCHOR), min(int(n * SSR_RATIO), k1)
    visual = np.arange(s, s + n)
    scores = relevance(model, ivr_layer - 1, hs[ivr_layer - 1], visual,
                       positions if variant.ivr_rope else None, variant.scaled)
    features = rms_norm(hs[ivr_layer][visual], model.model.language_model.norm)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    ivr = farthest_points(features, top(scores, anchors, margins), k1, margins)

    keep = np.concatenate([np.arange(s), s + np.array(ivr), np.arange(s + n, len(hs[0]))])
    kept_positions = positions[:, keep]
    h = compacted_input(model, hs[ivr_layer][keep], kept_positions, ivr_layer, SSR_LAYER - 1)
    keys = np.arange(s, min(s + (n if variant.unfixed_slice else k1), len(keep)))
    scores = relevance(model, SSR_LAYER - 1, h, keys, kept_positions, variant.scaled)
    ssr = [ivr[j] if j < k1 else ("text", int(keep[s + j])) for j in top(scores, k2, margins)]
    return ivr, sorted(ssr, key=lambda v: (isinstance(v, tuple), v))


# ------------------------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    name: str
    inputs: object
    hidden: dict  # layer -> input of that layer in the model's own forward [S, D], float64
    positions: np.ndarray  # [3, S]
    start: int
    n: int
    kept: dict  # ivr_layer -> {"ivr": [...], "ssr": [...]} from HalfVReference
    rows: dict  # ivr_layer -> (snapshots before every layer, post-cut inputs of every layer) of the reference


def images_and_prompts():
    """Digit-task images with their own questions at 224x224 (N = 64) and 448x448 (N = 256), plus a synthetic
    texture at each size."""
    out = [(s.name, s.image, s.prompt) for s in task_set(6, seed=11, sizes=[(224, 224), (448, 448)])]
    out += [("texture-224x224", make_image(224, 224, 21), "What is in the image?"),
            ("texture-448x448", make_image(448, 448, 22), "Which digits are in row 2, left to right?")]
    return out


@pytest.fixture(scope="module")
def cases(qwen):
    adapter, loaded, stack = qwen
    out = []
    for name, image, prompt in images_and_prompts():
        inputs = adapter.prepare(loaded, [image], [prompt])
        case = Case(name, inputs, layer_inputs(loaded.model, inputs), inputs.positions[:, 0].double().numpy(),
                    int(inputs.visual_start[0]), inputs.num_visual, {}, {})
        for ivr_layer in IVR_LAYERS:
            ref = HalfVReference(stack, schedule(ivr_layer))
            snapshots, captured = {}, []
            done = ref.run(ref.begin(inputs), snapshots=snapshots, capture=captured)
            case.kept[ivr_layer] = {stage: done.kept[stage][0].tolist() for stage in ("ivr", "ssr")}
            case.rows[ivr_layer] = (snapshots, captured)
        out.append(case)
    assert sorted({c.n for c in out}) == [64, 256]
    return out


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("ivr_layer", IVR_LAYERS)
def test_reference_keeps_exactly_what_the_papers_rule_keeps(qwen, cases, ivr_layer):
    _, loaded, _ = qwen
    for case in cases:
        margins = []
        ivr, ssr = oracle(loaded.model, case, ivr_layer, margins=margins)
        assert len(ivr) == case.n // 4 and len(ssr) == case.n * 5 // 100
        # a mismatch where the oracle's closest decision is well above fp32 rounding (~1e-7) is a real difference
        closest = f"the oracle's closest decision was {min(margins):.2g} from a tie"
        assert case.kept[ivr_layer]["ivr"] == ivr, f"{case.name} IVR: {closest}"
        assert case.kept[ivr_layer]["ssr"] == ssr, f"{case.name} SSR: {closest}"


@pytest.mark.parametrize("variant", [Variant(ivr_rope=True), Variant(scaled=True), Variant(unfixed_slice=True)],
                         ids=["rope-for-ivr", "scaled-logits", "unfixed-ssr-slice"])
def test_negative_controls_disagree_with_the_reference(qwen, cases, variant):
    """Each mistake changes a kept set somewhere in these cases, so the exact comparison above would catch it."""
    _, loaded, _ = qwen
    differs = any(list(oracle(loaded.model, case, ivr_layer, variant)) != [kept["ivr"], kept["ssr"]]
                  for case in cases for ivr_layer, kept in case.kept.items())  # stops at the first difference
    assert differs, f"{variant} kept the reference's sets on every case: the oracle comparison has no power there"


@pytest.mark.parametrize("ivr_layer", IVR_LAYERS)
def test_selection_graph_selects_what_the_prefill_selects(qwen, cases, ivr_layer):
    """SelectionGraph (bench's timing of the selection) on the states the reference's two cuts read: the same kept
    sets, and the same compacted rows after each cut. Scoring SSR on the IVR output (the input of L1, not of L2-1)
    keeps other rows."""
    _, _, stack = qwen
    for case in cases:
        snapshots, captured = case.rows[ivr_layer]
        ivr, ssr = snapshots[ivr_layer], snapshots[SSR_LAYER]
        graph = SelectionGraph(stack, schedule(ivr_layer), case.n)
        with torch.no_grad():
            h_ivr, h_out, cos, sin, valid, kept_ivr, kept_ssr = graph(
                ivr.prev_input, ivr.h, ivr.cos, ivr.sin, ivr.valid, ivr.start, ssr.prev_input, ssr.h)
        assert kept_ivr[0].tolist() == case.kept[ivr_layer]["ivr"], case.name
        assert kept_ssr[0].tolist() == case.kept[ivr_layer]["ssr"], case.name
        assert torch.equal(h_ivr, captured[ivr_layer][0]) and torch.equal(h_out, captured[SSR_LAYER][0])
        reference_after = HalfVReference(stack, schedule(ivr_layer)).run(ssr, stop=SSR_LAYER + 1)
        assert torch.equal(cos, reference_after.cos) and torch.equal(valid, reference_after.valid)


def test_exported_selection_graph_in_onnxruntime_keeps_the_oracles_sets(qwen, cases, tmp_path):
    """The selection as the prefill graph traces it (TopK, the unrolled fill), exported once at N = 64 and run in
    ONNX Runtime on three digit images that share one prompt (static shapes): the oracle's sets, index for index."""
    import onnxruntime as ort

    from halfv_export.graphs.specs import selection_spec

    adapter, loaded, stack = qwen
    ivr_layer, prompt = 2, "Read all digits row by row."
    samples = task_set(3, seed=5, sizes=[(224, 224)])
    first = adapter.prepare(loaded, [samples[0].image], [prompt])
    spec = selection_spec(stack, schedule(ivr_layer), first.num_visual, "oracle", first.positions,
                          int(first.visual_start[0]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(spec.export(tmp_path)), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for sample in samples:
        inputs = adapter.prepare(loaded, [sample.image], [prompt])
        case = Case(sample.name, inputs, layer_inputs(loaded.model, inputs), inputs.positions[:, 0].double().numpy(),
                    int(inputs.visual_start[0]), inputs.num_visual, {}, {})
        ref = HalfVReference(stack, schedule(ivr_layer))
        snapshots = {}
        ref.run(ref.begin(inputs), stop=SSR_LAYER + 1, snapshots=snapshots)
        a, b = snapshots[ivr_layer], snapshots[SSR_LAYER]
        feeds = dict(zip(spec.input_names, (t.numpy() for t in (a.prev_input, a.h, a.cos, a.sin, a.valid, a.start,
                                                                b.prev_input, b.h))))
        got = dict(zip(names, session.run(None, feeds)))
        ivr, ssr = oracle(loaded.model, case, ivr_layer)
        assert got["kept_ivr"][0].tolist() == ivr and got["kept_ssr"][0].tolist() == ssr, sample.name
