"""The export stage: every graph a deployment needs, for every image-size bucket, plus artifacts.json.

    embed.onnx              input_ids [B, S] -> embeds [B, S, D]
    vision_HxW.onnx         pixel patches of one HxW image -> visual features [N, D]
    prefill_HxW.onnx        HalfV prefill for N = N(HxW): IVR + SSR as TopK/ArgMax/Gather ops
    prefill_full.onnx       the unpruned prefill (any N), for comparison and text-only prompts
    decode.onnx             one token over the pruned cache (one valid-mask input per cache-length group)
    decode_full.onnx        one token over the unpruned cache

Everything is written into a staging folder inside --out and renamed into place when all graphs passed their
checks; artifacts.json is written last.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch.export import Dim

from ..base.errors import BadInput
from ..graphs.adapter import BackboneAdapter, LoadedModel, Processing
from ..graphs.export_forward import DecodeGraph, PrefillGraph
from ..graphs.pruning import PruneSchedule, budgets
from ..base.atomic import prepare_out_dir, write_text_atomic
from ..graphs.onnx_export import TOPK_LIMIT, batch_dim, export_module, seq_dim

ARTIFACTS_FORMAT = 1
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_image_size(text: str) -> tuple[int, int]:
    """'HxW' -> (h, w)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadInput(f"--image-size {text!r}: write it as HEIGHTxWIDTH, e.g. 448x448") from None
    if h <= 0 or w <= 0:
        raise BadInput(f"--image-size {text!r}: height and width must be positive")
    return h, w


def resolve_buckets(adapter: BackboneAdapter, processing: Processing, sizes: list[tuple[int, int]],
                    schedule: PruneSchedule) -> list[dict]:
    """Image sizes -> distinct buckets with their static budgets; each must be one the processor produces."""
    buckets: dict[tuple[int, int], dict] = {}
    for size in sizes:
        bucket, n = adapter.bucket_for(processing, size)
        if bucket != size:
            raise BadInput(f"--image-size {size[0]}x{size[1]} is not a size the image processor produces (it resizes "
                           f"to {bucket[0]}x{bucket[1]}); use --image-size {bucket[0]}x{bucket[1]}")
        plan = budgets(n, schedule)
        if plan.k1 < 1 or (schedule.ssr_mode == "topk" and plan.k2 < 1):
            raise BadInput(f"bucket {size[0]}x{size[1]} has N={n} visual tokens: K1={plan.k1}, K2={plan.k2} at "
                           f"keep_ratio={schedule.keep_ratio}; use a larger image size or larger ratios")
        if max(plan.k1, plan.k2) > TOPK_LIMIT:
            raise BadInput(f"bucket {size[0]}x{size[1]} needs TopK with K={plan.k1} > {TOPK_LIMIT} (TensorRT's "
                           "limit); use a smaller image size or a smaller keep ratio")
        buckets[bucket] = {"size": list(bucket), "num_visual": n, **{k: v for k, v in asdict(plan).items() if k != "n"},
                           "vision": f"vision_{bucket[0]}x{bucket[1]}.onnx",
                           "prefill": f"prefill_{bucket[0]}x{bucket[1]}.onnx"}
    return list(buckets.values())


def _prefill_example(adapter, loaded, processing, bucket, batch=2):
    from ..base.data import synthetic_set

    images = [s.image.resize((bucket[1], bucket[0])) for s in synthetic_set(batch, seed=99)]
    prompts = ["What is shown here?", "Describe the shapes, colours and any text in this picture."][:batch]
    return adapter.prepare(loaded, images, prompts)


def export_artifacts(adapter: BackboneAdapter, loaded: LoadedModel, schedule: PruneSchedule, schedule_doc: dict,
                     sizes: list[tuple[int, int]], out: Path, step: Callable[[str], None] = lambda name: None,
                     precision: str = "fp32") -> dict:
    """Export every graph. precision fp16/bf16 casts the weights; the graph code keeps scores, softmax, norms and
    the farthest-point fill in fp32 with explicit casts, which strongly typed TensorRT builds honour."""
    if precision not in PRECISIONS:
        raise BadInput(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    out = prepare_out_dir(out)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    buckets = resolve_buckets(adapter, processing, sizes, schedule)
    stack = adapter.text_stack(loaded)
    staging = out / f".staging-{time.time_ns()}"
    staging.mkdir()
    try:
        files = adapter.save_processing(loaded, staging)
        write_text_atomic(staging / "schedule.json", json.dumps(schedule_doc, indent=2) + "\n")
        b, s = batch_dim(), seq_dim(4)

        loaded.model.to(dtype)
        step("embed.onnx")
        ids = torch.zeros((2, 8), dtype=torch.long)
        export_module(stack.embed_tokens, (ids,), staging / "embed.onnx", ["input_ids"], ["embeds"],
                      ({0: b, 1: s},))

        first_example = None
        for bucket in buckets:
            size = tuple(bucket["size"])
            example = _prefill_example(adapter, loaded, processing, size)
            first_example = first_example or example
            step(bucket["vision"])
            pixels = adapter.host_inputs(processing, [_blank(size)], ["x"]).pixel_values[0].to(dtype)
            export_module(adapter.vision_graph(loaded, size), (pixels,), staging / bucket["vision"],
                          ["pixel_values"], ["visual_features"], None)
            step(bucket["prefill"])
            graph = PrefillGraph(stack, schedule, bucket["num_visual"]).eval()
            seq = seq_dim(bucket["num_visual"] + 2)
            export_module(graph, (example.embeds, example.attention_mask, example.positions, example.visual_start),
                          staging / bucket["prefill"], ["embeds", "attention_mask", "positions", "visual_start"],
                          graph.output_names(), ({0: b, 1: seq}, {0: b, 1: seq}, {1: b, 2: seq}, {0: b}))
            bucket["groups"] = graph.group_of_layer()

        step("prefill_full.onnx")
        full = PrefillGraph(stack, None, 0).eval()
        example = first_example
        seq = seq_dim(4)
        export_module(full, (example.embeds, example.attention_mask, example.positions, example.visual_start),
                      staging / "prefill_full.onnx", ["embeds", "attention_mask", "positions", "visual_start"],
                      full.output_names(), ({0: b, 1: seq}, {0: b, 1: seq}, {1: b, 2: seq}, {0: b}))

        for name, groups in (("decode.onnx", buckets[0]["groups"]), ("decode_full.onnx", [0] * stack.num_layers)):
            step(name)
            _export_decode(stack, groups, staging / name, example, dtype)

        meta = {
            "format": ARTIFACTS_FORMAT, "backbone": adapter.name, "source": loaded.source, "precision": precision,
            "schedule": asdict(schedule), "buckets": buckets, "groups": buckets[0]["groups"],
            "num_layers": stack.num_layers, "num_kv_heads": stack.num_kv_heads, "head_dim": stack.head_dim,
            "hidden_size": stack.embed_tokens.embedding_dim, "position_rows": 3 if stack.mrope else 1,
            "eos_token_ids": sorted(adapter.eos_token_ids(loaded)), "processing_files": files,
            "graphs": ["embed.onnx", "prefill_full.onnx", "decode.onnx", "decode_full.onnx"]
            + [x for bk in buckets for x in (bk["vision"], bk["prefill"])],
        }
        for item in sorted(staging.iterdir()):
            item.replace(out / item.name)
        write_text_atomic(out / "artifacts.json", json.dumps(meta, indent=2) + "\n")
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _blank(size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", (size[1], size[0]), (127, 127, 127))


def _export_decode(stack, groups: list[int], path: Path, example, dtype=torch.float32) -> None:
    """Decode graph: a batch of 2, past lengths per group as separate dynamic dims (valid mask = past + 1)."""
    graph = DecodeGraph(stack, groups).eval()
    b = batch_dim()
    n_groups = len(set(groups))
    past_dims = [Dim(f"past_{g}", min=2, max=32768) for g in range(n_groups)]
    lengths = [7 + 3 * g for g in range(n_groups)]
    ids = torch.zeros((2, 1), dtype=torch.long)
    positions = torch.full((example.positions.shape[0], 2, 1), 9, dtype=torch.long)
    valids = [torch.ones((2, lengths[g] + 1), dtype=torch.long) for g in range(n_groups)]
    past = []
    for i in range(stack.num_layers):
        shape = (2, stack.num_kv_heads, lengths[groups[i]], stack.head_dim)
        past += [torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)]
    rest = [{0: b, 1: past_dims[g] + 1} for g in range(n_groups)]
    rest += [{0: b, 2: past_dims[groups[i]]} for i in range(stack.num_layers) for _ in range(2)]
    export_module(graph, (ids, positions, *valids, *past), path, graph.input_names(), graph.output_names(),
                  ({0: b}, {1: b}, tuple(rest)))  # forward(input_ids, positions, *rest)
