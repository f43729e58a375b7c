"""Write a random-weight Qwen2.5-VL checkpoint with a published model's shapes, for size and memory measurements.

The text and vision shapes come from a published config (model-configs.json, `--model-name`); token ids, tokenizer,
chat template and preprocessor come from the embedded default, so the checkpoint loads through the normal safe path.
`--layers` keeps the first N decoder layers (the per-layer shapes stay published). Weights are drawn in `--dtype`
directly (no fp32 model in memory) and saved by transformers, in shards when `--max-shard-size` is given.

    python tools/shaped_checkpoint.py --configs model-configs.json --model-name Qwen/Qwen2.5-VL-3B-Instruct \\
        --layers 4 --dtype float32 --out /tmp/q3b-4l

High resolution with a small LLM (the published tower's widths, 4 blocks, the embedded default's LLM, a processor
that allows 1792x1792):

    python tools/shaped_checkpoint.py --configs tests/data/model-configs.json \\
        --model-name Qwen/Qwen2.5-VL-3B-Instruct --embedded-text --vision-depth 4 --max-pixels 12845056 \\
        --dtype float32 --out /tmp/q-highres
Random weights: measurements of size, memory and time only, never of quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from halfv_export.graphs import get_adapter

TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps")
VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
               "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, required=True, help="model-configs.json")
    parser.add_argument("--model-name", required=True, help="its _model entry, e.g. Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--layers", type=int, help="decoder layers to keep (default: all)")
    parser.add_argument("--embedded-text", action="store_true", help="keep the embedded default's small LLM")
    parser.add_argument("--vision-depth", type=int, help="vision blocks to keep (full-attention indexes below it; "
                        "the last kept block when none is)")
    parser.add_argument("--max-pixels", type=int, help="the image processor's max_pixels (published: 12845056)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--max-shard-size", help="e.g. 2GB: several shards + model.safetensors.index.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    published = next(m for m in json.loads(args.configs.read_text())["models"] if m["_model"] == args.model_name)
    adapter = get_adapter("qwen2.5-vl")
    cfg = json.loads((adapter.embedded_dir / "config.json").read_text())
    if not args.embedded_text:
        cfg["text_config"].update({k: published[k] for k in TEXT_KEYS})
        cfg["text_config"]["rope_parameters"]["mrope_section"] = published["rope_scaling"]["mrope_section"]
        cfg["tie_word_embeddings"] = published["tie_word_embeddings"]
    if args.layers:
        cfg["text_config"]["num_hidden_layers"] = args.layers
    vision = cfg["vision_config"]
    vision.update({k: published["vision_config"][k] for k in VISION_KEYS})
    if args.vision_depth:
        vision["depth"] = args.vision_depth
        vision["fullatt_block_indexes"] = ([i for i in vision["fullatt_block_indexes"] if i < args.vision_depth]
                                           or [args.vision_depth - 1])
    vision["out_hidden_size"] = cfg["text_config"]["hidden_size"]  # the merger feeds this LLM
    config = adapter.config_class(**cfg)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype: no fp32 model in memory
    try:
        model = adapter.model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)
    args.out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    model.save_pretrained(args.out, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(adapter.embedded_dir / name, args.out / name)
    if args.max_pixels:
        processor = json.loads((args.out / "preprocessor_config.json").read_text())
        processor["max_pixels"] = args.max_pixels
        (args.out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params} parameters, {sum(p.numel() * p.element_size() for p in model.parameters())} bytes "
          f"at {args.dtype}")


if __name__ == "__main__":
    main()
