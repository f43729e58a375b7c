"""`halfv-export bench`: speed, memory and FLOPs side by side, in one process, on the same inputs.

Sections (bench.json keys):
  flops_curves   analytic full/HalfV ratio for the published configs, N = 576 .. 16384 (paper schedules)
  cpu_prefill    exported full vs HalfV prefill in ONNX Runtime CPU on a Qwen2.5-VL-shaped LLM with random weights
                 (default 0.5B class) for each N: medians, ratio, FLOPs ratio, efficiency = measured / FLOPs ratio
  eager          at the reference N: eager PyTorch unpruned and HalfV prefill on the same inputs
  selection      at the reference N: the selection work alone (scores, farthest-point fill, gathers) as its own graph
  genai          ONNX Runtime GenAI's model builder on the same checkpoint, its unpruned prefill on the same ids
  decode         one decode step, full vs HalfV cache, and the KV-cache bytes of each
  gpu            eager bf16 prefill on a 7B-shaped LLM when CUDA is present (skipped otherwise)
Peak memory: each measurement records the peak RSS seen by a sampling thread while it ran (session creation
included) and its rise over the RSS before it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..base.atomic import prepare_out_dir, write_text_atomic
from ..graphs.onnx_export import batch_dim, export_module, seq_dim
from ..graphs.adapter import LoadedModel, PrefillInputs, adapter_for_model_type
from ..graphs.checkpoint import seeded_model
from ..graphs.export_forward import DecodeGraph, PrefillGraph
from ..graphs.halfv import HalfVReference
from ..graphs.pruning import PruneSchedule, budgets, gather_rows, keep_index, select_before_layer
from ..graphs.qwen2_5_vl import Qwen25VLAdapter, _rope_index_fn
from .flops import LMShape, prefill_flops
from .report import timed

CONFIGS = Path(__file__).parent / "data" / "model-configs.json"
CURVE_POINTS = (576, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class BenchShape:
    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936


# ------------------------------------------------------------------------------------------------ measuring
class PeakRss:
    """Peak resident memory while the block runs, sampled every 5 ms from /proc/self/statm."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def result(self) -> dict:
        return {"peak_rss_mb": round(self.peak / 2**20, 1), "rise_mb": round((self.peak - self.before) / 2**20, 1)}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_ort(path: Path, feeds: dict, runs: int, outputs: list[str] | None = None) -> dict:
    with PeakRss() as rss:
        session = ort_session(path)
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        result = timed(lambda: session.run(outputs, feeds), runs)
    return {**result, **rss.result()}


# ------------------------------------------------------------------------------------------------ model
def bench_config(shape: BenchShape) -> Qwen2_5_VLConfig:
    head_dim = shape.hidden // shape.heads
    t = head_dim // 8  # M-RoPE sections (t, h, w) summing to head_dim / 2, in Qwen's 2:3:3 proportion
    h = (head_dim // 2 - t) // 2
    text = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [t, h, head_dim // 2 - t - h]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=shape.hidden,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=shape.vocab - 2,
                            vision_start_token_id=shape.vocab - 4, vision_end_token_id=shape.vocab - 3,
                            video_token_id=shape.vocab - 1, architectures=["Qwen2_5_VLForConditionalGeneration"])


def bench_inputs(config, stack, visual: int, text: int, seed: int = 0) -> tuple[PrefillInputs, torch.Tensor]:
    """One prompt: `text` ordinary tokens around an h x w grid of `visual` merged image tokens, the most square
    factorisation (2048 -> 32 x 64), with M-RoPE positions as the model computes them. Visual embeddings are random
    features; returns the inputs and the token ids."""
    rows = max(d for d in range(1, int(visual ** 0.5) + 1) if visual % d == 0)
    cols = visual // rows
    g = torch.Generator().manual_seed(seed)
    before = text // 3
    vocab = config.text_config.vocab_size - 8
    ids = torch.cat([torch.randint(0, vocab, (before,), generator=g), torch.full((visual,), config.image_token_id),
                     torch.randint(0, vocab, (text - before,), generator=g)])[None]
    mask = torch.ones_like(ids)
    positions, _ = _rope_index_fn(config)(ids, mm_token_type_ids=(ids == config.image_token_id).int(),
                                          image_grid_thw=torch.tensor([[1, 2 * rows, 2 * cols]]), attention_mask=mask)
    with torch.no_grad():
        embeds = stack.embed_tokens(ids)
        embeds[:, before:before + visual] = torch.randn(1, visual, config.text_config.hidden_size, generator=g) * 0.05
    inputs = PrefillInputs(input_ids=ids, embeds=embeds, attention_mask=mask, positions=positions,
                           visual_start=torch.tensor([before]), num_visual=visual,
                           next_positions=positions.max(dim=2).values + 1)
    return inputs, ids


def feeds_of(inputs: PrefillInputs) -> dict:
    return {"embeds": inputs.embeds.numpy(), "attention_mask": inputs.attention_mask.numpy(),
            "positions": inputs.positions.numpy(), "visual_start": inputs.visual_start.numpy()}


def export_prefill(stack, schedule, inputs: PrefillInputs, path: Path) -> Path:
    graph = PrefillGraph(stack, schedule, inputs.num_visual if schedule is not None else 0).eval()
    b, s = batch_dim(), seq_dim(inputs.num_visual + 2 if schedule is not None else 4)
    return export_module(graph, (inputs.embeds, inputs.attention_mask, inputs.positions, inputs.visual_start), path,
                         list(feeds_of(inputs)), graph.output_names(),
                         ({0: b, 1: s}, {0: b, 1: s}, {1: b, 2: s}, {0: b}))


class SelectionGraph(nn.Module):
    """The HalfV selection work alone, as it runs inside the prefill graph: IVR scores at L1-1 + anchors + FPS +
    the gathers, then SSR scores at L2-1 + top-K2 + the gathers. Hidden states are inputs (random in the bench)."""

    def __init__(self, stack, schedule: PruneSchedule, n: int):
        super().__init__()
        self.stack, self.schedule, self.n = stack, schedule, n
        self.layers, self.norm = nn.ModuleList(stack.layers), stack.norm
        self.plan = budgets(n, schedule)

    def forward(self, h_prev, h, cos, sin, valid, start):
        st, sched, plan = self.stack, self.schedule, self.plan
        sel = select_before_layer(st, sched, plan, sched.ivr_layer, h_prev, h, start, self.n, cos, sin, True)
        index = keep_index(start, sel, self.n, h.shape[1])
        h, cos, sin, valid = (gather_rows(t, index) for t in (h, cos, sin, valid))
        if sched.ssr_mode == "topk":
            sel2 = select_before_layer(st, sched, plan, sched.ssr_layer, h, h, start, plan.k1, cos, sin, True)
            index = keep_index(start, sel2, plan.k1, h.shape[1])
            h, cos, sin, valid = (gather_rows(t, index) for t in (h, cos, sin, valid))
        return h, cos, sin, valid


# ------------------------------------------------------------------------------------------------ sections
def flops_curves(points=CURVE_POINTS, text: int = 64) -> list[dict]:
    curves = []
    for model in json.loads(CONFIGS.read_text())["models"]:
        adapter = adapter_for_model_type(model.get("model_type", ""))
        if adapter is None:
            continue
        shape = LMShape.from_config(model)
        sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
        rows = [{"visual": n, "ratio": round(prefill_flops(shape, n, text, sched).ratio, 3),
                 "full_tflop": round(prefill_flops(shape, n, text, sched).full / 1e12, 3)} for n in points]
        curves.append({"model": model["_model"], "backbone": adapter.name, "schedule": asdict(sched), "text": text,
                       "points": rows})
    return curves


def genai_peer(checkpoint: Path, out: Path, ids: torch.Tensor, positions: torch.Tensor, runs: int, log,
               kv_heads: int, head_dim: int) -> dict:
    """Build the same checkpoint with ONNX Runtime GenAI's model builder (fp32, CPU) and time its prefill on the
    same token ids through an ONNX Runtime session (its graph: GroupQueryAttention, MRoPE applied outside)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {"skipped": "onnxruntime-genai is not installed (pip install 'halfv-export[bench]')"}
    target = out / "genai"
    shutil.rmtree(target, ignore_errors=True)
    log("building the checkpoint with onnxruntime_genai.models.builder (fp32, cpu)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(checkpoint), "-o",
                           str(target), "-p", "fp32", "-e", "cpu", "-c", str(out / "genai-cache")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not (target / "model.onnx").exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"model builder failed: {tail[0][:300]}"}
    build_s = round(time.perf_counter() - started, 1)
    session_inputs = {i.name: i for i in ort_session(target / "model.onnx").get_inputs()}
    feeds = {}
    for name, info in session_inputs.items():
        if name == "input_ids":
            feeds[name] = ids.numpy()
        elif name == "attention_mask":
            feeds[name] = np.ones_like(ids.numpy())
        elif name == "position_ids":
            feeds[name] = positions.numpy()
        elif name.startswith("past_key_values"):  # [batch, kv_heads, past_len = 0, head_dim]: an empty cache
            feeds[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        else:
            return {"error": f"unexpected GenAI graph input {name}"}
    result = measure_ort(target / "model.onnx", feeds, runs, ["logits"])
    ops = {}
    import onnx

    for node in onnx.load(str(target / "model.onnx"), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {**result, "build_seconds": build_s, "contrib_ops": sorted(k for k in ops if k in (
        "GroupQueryAttention", "MRotaryEmbedding", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
        "RotaryEmbedding", "MatMulNBits"))}


def gpu_section(runs: int) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    shape = BenchShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
    config = bench_config(shape)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    adapter = Qwen25VLAdapter()
    stack = adapter.text_stack(LoadedModel(model=model, tokenizer=None, image_processor=None, source="bench-7b"))
    sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
    rows = []
    for n in (1024, 4096):
        inputs, _ = bench_inputs(config, stack, n, 64)
        inputs = PrefillInputs(**{**inputs.__dict__, **{k: getattr(inputs, k).cuda() for k in (
            "input_ids", "embeds", "attention_mask", "positions", "visual_start", "next_positions")}})

        def run(schedule):
            HalfVReference(stack, schedule).prefill(inputs)
            torch.cuda.synchronize()

        full, halfv = timed(lambda: run(None), runs), timed(lambda: run(sched), runs)
        f = prefill_flops(LMShape.from_config(config.to_dict()), n, 64, sched)
        rows.append({"visual": n, "full_ms": full["median_ms"], "halfv_ms": halfv["median_ms"],
                     "measured_ratio": round(full["median_ms"] / halfv["median_ms"], 3), "flops_ratio": round(f.ratio, 3)})
    return {"device": torch.cuda.get_device_name(), "dtype": "bf16", "shape": asdict(shape), "eager_prefill": rows}


# ------------------------------------------------------------------------------------------------ driver
def run_bench(out: Path, shape: BenchShape = BenchShape(), visual: tuple[int, ...] = (256, 1024, 2048),
              text: int = 64, runs: int = 5, reference_visual: int = 1024, genai: bool = True,
              log: Callable[[str], None] = print) -> dict:
    import onnxruntime as ort

    out = prepare_out_dir(out)
    work = out / "work"
    work.mkdir(exist_ok=True)
    config = bench_config(shape)
    adapter = Qwen25VLAdapter()
    log(f"building a random-weight Qwen2.5-VL-shaped LLM: {shape}")
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed=0)
    stack = adapter.text_stack(LoadedModel(model=model, tokenizer=None, image_processor=None, source="bench"))
    sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
    lm = LMShape.from_config(config.to_dict())
    result = {"shape": asdict(shape), "schedule": asdict(sched), "text_tokens": text, "weights": "random",
              "device": f"CPU ({os.cpu_count()} cores), ONNX Runtime {ort.__version__} CPU, ORT_ENABLE_ALL, "
                        f"torch {torch.__version__}", "runs": runs, "flops_curves": flops_curves(text=text)}

    inputs = {n: bench_inputs(config, stack, n, text) for n in sorted(set(visual) | {reference_visual})}
    log("exporting the unpruned prefill graph")
    full_path = export_prefill(stack, None, inputs[reference_visual][0], work / "prefill_full.onnx")
    rows = []
    for n in visual:
        log(f"N={n}: exporting the HalfV prefill graph and timing both")
        path = export_prefill(stack, sched, inputs[n][0], work / f"prefill_{n}.onnx")
        feeds = feeds_of(inputs[n][0])
        full = measure_ort(full_path, feeds, runs, ["logits"])
        halfv = measure_ort(path, feeds, runs, ["logits"])
        f = prefill_flops(lm, n, text, sched)
        rows.append({"visual": n, "full": full, "halfv": halfv,
                     "measured_ratio": round(full["median_ms"] / halfv["median_ms"], 3),
                     "flops_ratio": round(f.ratio, 3),
                     "efficiency": round(full["median_ms"] / halfv["median_ms"] / f.ratio, 3)})
        if n != reference_visual:
            path.unlink()
            Path(f"{path}.data").unlink(missing_ok=True)
    result["cpu_prefill"] = rows

    ref_inputs, ref_ids = inputs[reference_visual]
    log(f"N={reference_visual}: eager PyTorch prefill, unpruned and HalfV")
    with torch.no_grad():
        eager = {}
        for name, schedule in (("full", None), ("halfv", sched)):
            with PeakRss() as rss:
                eager[name] = timed(lambda: HalfVReference(stack, schedule).prefill(ref_inputs), runs)
            eager[name].update(rss.result())
    result["eager"] = {"visual": reference_visual, **eager}

    log(f"N={reference_visual}: the selection work alone")
    sel_graph = SelectionGraph(stack, sched, reference_visual).eval()
    seq = ref_inputs.seq_len
    g = torch.Generator().manual_seed(1)
    h_prev, h = (torch.randn(1, seq, shape.hidden, generator=g) for _ in range(2))
    cos, sin = stack.rotary(h, ref_inputs.positions)
    sel_args = (h_prev, h, cos, sin, ref_inputs.attention_mask, ref_inputs.visual_start)
    sel_path = export_module(sel_graph, sel_args, work / "selection.onnx",
                             ["h_prev", "h", "cos", "sin", "valid", "start"], ["h_out", "cos_out", "sin_out", "valid_out"],
                             None)
    selection = measure_ort(sel_path, dict(zip(["h_prev", "h", "cos", "sin", "valid", "start"],
                                                (t.numpy() for t in sel_args))), runs)
    ref_row = next(r for r in rows if r["visual"] == reference_visual)
    selection["share_of_halfv_prefill"] = round(selection["median_ms"] / ref_row["halfv"]["median_ms"], 4)
    f = prefill_flops(lm, reference_visual, text, sched)
    selection["flops_share"] = round(f.overhead / f.halfv, 4)
    result["selection"] = selection

    log(f"N={reference_visual}: decode step on the full and the pruned cache")
    result["decode"] = decode_section(stack, sched, ref_inputs, full_path, work, runs)

    if genai:
        checkpoint = work / "checkpoint"
        model.save_pretrained(checkpoint)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
            shutil.copy(adapter.embedded_dir / name, checkpoint / name)
        peer = genai_peer(checkpoint, work, ref_ids, ref_inputs.positions, runs, log, stack.num_kv_heads, stack.head_dim)
        if "median_ms" in peer:
            peer["halfv_speedup_over_genai"] = round(peer["median_ms"] / ref_row["halfv"]["median_ms"], 3)
            peer["needed"] = round(0.9 * ref_row["flops_ratio"], 3)
        result["genai"] = peer
    else:
        result["genai"] = {"skipped": "--no-genai"}
    result["gpu"] = gpu_section(runs)
    write_text_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    from .bench_report import render_bench, bench_plots

    bench_plots(result, out)
    write_text_atomic(out / "bench.md", render_bench(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def decode_section(stack, sched, inputs: PrefillInputs, full_path: Path, work: Path, runs: int) -> dict:
    layers = stack.num_layers
    section = {}
    for name, schedule, prefill_path in (("full", None, full_path), ("halfv", sched, work / f"prefill_{inputs.num_visual}.onnx")):
        graph = PrefillGraph(stack, schedule, inputs.num_visual if schedule is not None else 0)
        groups = graph.group_of_layer()
        session = ort_session(prefill_path)
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds_of(inputs))))
        del session
        past = [outs[f"present_{kind}_{i}"] for i in range(layers) for kind in ("key", "value")]
        valid = [outs[f"cache_valid_{g}"] for g in sorted(set(groups))]
        decode = DecodeGraph(stack, groups).eval()
        b = batch_dim()
        dims = [torch.export.Dim(f"past_{g}", min=2, max=32768) for g in sorted(set(groups))]
        rest = [{0: b, 1: dims[g] + 1} for g in sorted(set(groups))]
        rest += [{0: b, 2: dims[groups[i]]} for i in range(layers) for _ in range(2)]
        token = torch.tensor([[7]])
        pos = inputs.next_positions[..., None]
        valid_t = [torch.from_numpy(np.concatenate([v, np.ones((1, 1), dtype=v.dtype)], 1)) for v in valid]
        past_t = [torch.from_numpy(p) for p in past]
        path = export_module(decode, (token, pos, *valid_t, *past_t), work / f"decode_{name}.onnx",
                             decode.input_names(), decode.output_names(), ({0: b}, {1: b}, tuple(rest)))
        feeds = dict(zip(decode.input_names(), [token.numpy(), pos.numpy(), *[v.numpy() for v in valid_t], *past]))
        section[name] = {**measure_ort(path, feeds, runs, ["logits"]),
                         "kv_cache_bytes": int(sum(p.nbytes for p in past)),
                         "cache_lengths": sorted({int(p.shape[2]) for p in past})}
    section["kv_cache_ratio"] = round(section["full"]["kv_cache_bytes"] / section["halfv"]["kv_cache_bytes"], 3)
    return section
