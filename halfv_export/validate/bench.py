"""Prefill benchmark on a Qwen2.5-VL-shaped LLM with random weights: the exported full and HalfV prefill graphs
timed side by side in ONNX Runtime on the same inputs, beside the analytic FLOPs ratio.

Default shape: the 0.5B class (hidden 896, 24 layers, 14 query / 2 KV heads, MLP 4864, vocab 151936), N = 1024
visual tokens in a 32x32 merged grid, 64 other tokens. Random weights: speed only, no accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..exporter.atomic import prepare_out_dir, write_text_atomic
from ..exporter.onnx_export import batch_dim, export_module, seq_dim
from ..exporter.schedule import paper_fallback
from ..graphs.adapter import LoadedModel
from ..graphs.checkpoint import seeded_model
from ..graphs.export_forward import PrefillGraph
from ..graphs.pruning import PruneSchedule
from ..graphs.qwen2_5_vl import Qwen25VLAdapter, _rope_index_fn
from .flops import LMShape, prefill_flops
from .report import median_ms


@dataclass(frozen=True)
class BenchShape:
    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936


def bench_config(shape: BenchShape) -> Qwen2_5_VLConfig:
    head_dim = shape.hidden // shape.heads
    quarter = head_dim // 8  # M-RoPE sections (t, h, w) summing to head_dim / 2, in Qwen's 2:3:3 proportion
    mrope = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    text = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=shape.hidden,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=shape.vocab - 2,
                            vision_start_token_id=shape.vocab - 4, vision_end_token_id=shape.vocab - 3,
                            video_token_id=shape.vocab - 1)


def bench_inputs(config, stack, visual: int, text: int, seed: int = 0):
    """One prompt: `text` ordinary tokens around a square grid of `visual` merged image tokens."""
    side = int(round(visual ** 0.5))
    assert side * side == visual, "--visual-tokens must be a square number (a square image grid)"
    g = torch.Generator().manual_seed(seed)
    before = text // 3
    ids = torch.cat([torch.randint(0, config.text_config.vocab_size - 8, (before,), generator=g),
                     torch.full((visual,), config.image_token_id),
                     torch.randint(0, config.text_config.vocab_size - 8, (text - before,), generator=g)])[None]
    mask = torch.ones_like(ids)
    grid = torch.tensor([[1, 2 * side, 2 * side]])
    positions, _ = _rope_index_fn(config)(ids, mm_token_type_ids=(ids == config.image_token_id).int(),
                                          image_grid_thw=grid, attention_mask=mask)
    with torch.no_grad():
        embeds = stack.embed_tokens(ids)
        embeds[:, before:before + visual] = torch.randn(1, visual, config.text_config.hidden_size, generator=g) * 0.05
    return embeds, mask, positions, torch.tensor([before])


def run_bench(out: Path, shape: BenchShape = BenchShape(), visual: int = 1024, text: int = 64, runs: int = 5,
              threads: int | None = None, log: Callable[[str], None] = print) -> dict:
    import onnxruntime as ort

    out = prepare_out_dir(out)
    config = bench_config(shape)
    log(f"building a random-weight Qwen2.5-VL-shaped LLM: {shape}")
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed=0)
    adapter = Qwen25VLAdapter()
    stack = adapter.text_stack(LoadedModel(model=model, tokenizer=None, image_processor=None, source="bench"))
    values = paper_fallback(adapter.paper, shape.layers)
    schedule = PruneSchedule(**values)
    embeds, mask, positions, start = bench_inputs(config, stack, visual, text)
    feeds = {"embeds": embeds.numpy(), "attention_mask": mask.numpy(), "positions": positions.numpy(),
             "visual_start": start.numpy()}

    timings, export_s = {}, {}
    for name, sched in (("full", None), ("halfv", schedule)):
        graph = PrefillGraph(stack, sched, visual if sched is not None else 0).eval()
        path = out / f"bench_prefill_{name}.onnx"
        log(f"exporting {path.name}")
        started = time.perf_counter()
        seq = seq_dim(visual + 2)
        b = batch_dim()
        export_module(graph, (embeds, mask, positions, start), path, list(feeds), graph.output_names(),
                      ({0: b, 1: seq}, {0: b, 1: seq}, {1: b, 2: seq}, {0: b}))
        export_s[name] = round(time.perf_counter() - started, 1)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        log(f"timing {name} prefill ({runs} runs after a warm-up)")
        timings[name] = median_ms(lambda: session.run(["logits"], feeds), runs=runs)
        session = None  # free the first model before the second loads

    f = prefill_flops(LMShape.from_config(config.to_dict()), visual, text, schedule)
    measured = timings["full"] / timings["halfv"]
    result = {
        "shape": shape.__dict__, "visual_tokens": visual, "text_tokens": text, "schedule": values,
        "weights": "random", "runs": runs, "device": "CPU, ONNX Runtime " + ort.__version__ + " (ORT_ENABLE_ALL)",
        "prefill_ms": timings, "measured_ratio": measured, "flops_ratio": f.ratio,
        "efficiency": measured / f.ratio, "flops": {"full": f.full, "halfv": f.halfv, "overhead": f.overhead},
        "export_seconds": export_s,
    }
    write_text_atomic(out / "bench_prefill.json", json.dumps(result, indent=2) + "\n")
    return result
