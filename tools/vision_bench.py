"""Time and peak RSS of the exported Qwen2.5-VL vision graph (ONNX Runtime) against transformers' tower (eager
PyTorch) on the same input, each in its own process so that peak RSS is the process's own.

The tower is the published one read from tests/data/model-configs.json (default: Qwen2.5-VL-3B: depth 32, hidden
1280, 16 heads, MLP 3420, 112-px windows, full attention at blocks 7/15/23/31), fp32, RANDOM weights drawn from
--seed; --depth keeps the first blocks (and the full-attention indexes below it) for a shorter run.

    PYTHONPATH=. python tools/vision_bench.py --image-size 896x896
    PYTHONPATH=. python tools/vision_bench.py --image-size 1792x1792 --depth 8 --out /tmp/vb
    PYTHONPATH=. python tools/vision_bench.py --image-size 1792x1792 --depth 8 --out /tmp/vb --reuse --only ort --as-before
    PYTHONPATH=. python tools/vision_bench.py --image-size 896x896 --depth 16 --cut 7:0.25 --threads 1 --out /tmp/vbc

--cut BLOCK:KEEP exports the tower with the vision cut (graphs/vision_cut.py) and runs its eager reference
(eager_cut_vision, transformers' blocks) on the other side; the kept token indices of both must be equal.

Prints one JSON object: seconds and peak RSS (GiB) for eager and ONNX Runtime (session creation and one run, which
includes ORT_ENABLE_ALL optimisation as the engine stage does), their ratios, and max |ORT - eager|.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "model-configs.json"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def tower(model: str, depth: int | None, seed: int):
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    published = next(m for m in json.loads(CONFIGS.read_text())["models"] if m["_model"] == model)
    vision = dict(published["vision_config"])
    if depth is not None:
        vision["depth"] = depth
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < depth] or [depth - 1]
    config = Qwen2_5_VLConfig(vision_config=vision).vision_config
    config._attn_implementation = "sdpa"  # transformers' default for this tower
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = Qwen2_5_VisionTransformerPretrainedModel(config)
    return visual.float().eval()


def grid_of(size: tuple[int, int]) -> tuple[int, int, int]:
    return (1, size[0] // 14, size[1] // 14)


def run_eager(args) -> dict:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    visual = tower(args.model, args.depth, args.seed)
    pixels = torch.from_numpy(np.load(args.work / "pixels.npy"))
    grid = torch.tensor([grid_of(args.size)])
    start = time.perf_counter()
    with torch.no_grad():
        if args.cut:
            from halfv_export.graphs.vision_cut import eager_cut_vision

            out, tokens, _ = eager_cut_vision(visual, pixels, grid_of(args.size), args.cut)
            np.save(args.work / "eager_tokens.npy", tokens.numpy())
        else:
            out = visual(pixels, grid).pooler_output
    seconds = time.perf_counter() - start
    np.save(args.work / "eager.npy", out.numpy())
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib()}


def run_ort(args) -> dict:
    """The graph as `run` opens and runs it: OrtRunner's session and run options for a vision graph
    (engines/ort.tower_options); --ort-set adds session config entries and --no-arena / --no-mem-pattern switch ONNX Runtime's
    CPU arena / memory pattern off, for finding where memory goes."""
    import numpy as np

    from halfv_export.engines import ort as ort_engine

    plain = ort_engine.session_options

    def options(threads=None):
        chosen = plain(threads)
        for item in args.ort_set:
            key, value = item.split("=", 1)
            chosen.add_session_config_entry(key, value)
        if args.no_arena:
            chosen.enable_cpu_mem_arena = False
        if args.no_mem_pattern:
            chosen.enable_mem_pattern = False
        return chosen

    ort_engine.session_options = options
    if args.as_before:  # the runner before tower_options: shared mapping, no prepacking, the planner's buffer reuse
        ort_engine.is_tower = lambda file: False  # no file is a tower to the runner
    pixels = np.load(args.work / "pixels.npy")
    start = time.perf_counter()
    graph = next(args.work.glob("vision_*.onnx")).name
    runner = ort_engine.OrtRunner(args.work, threads=args.threads or None)  # holds the weights' mapping
    runner.session(graph)
    created = time.perf_counter()
    outputs = runner.run(graph, {"pixel_values": pixels})
    seconds = time.perf_counter() - created
    out = outputs["visual_features"]
    if "visual_tokens" in outputs:
        np.save(args.work / "ort_tokens.npy", outputs["visual_tokens"])
    np.save(args.work / "ort.npy", out)
    return {"seconds": seconds, "session_seconds": created - start, "peak_rss_gib": peak_rss_gib()}


def export(args) -> dict:
    import numpy as np
    import torch

    from halfv_export.graphs.qwen2_5_vl import QwenVisionBucket
    from halfv_export.graphs.shared_weights import WeightStore, parameter_names
    from halfv_export.graphs.specs import vision_spec

    visual = tower(args.model, args.depth, args.seed)
    grid = grid_of(args.size)
    pixels = torch.randn(grid[1] * grid[2], 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(args.seed + 1))
    np.save(args.work / "pixels.npy", pixels.numpy())
    start = time.perf_counter()
    spec = vision_spec(QwenVisionBucket(visual, grid, args.cut).eval(), pixels, args.size)
    store = WeightStore(args.work, parameter_names(visual))  # weights.bin + weights.json, as the export stage
    try:
        spec.export(args.work, store=store)
    finally:
        store.close()
    return {"export_seconds": time.perf_counter() - start, "patches": grid[1] * grid[2]}


def child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(args.work), "--image-size",
           f"{args.size[0]}x{args.size[1]}", "--model", args.model, "--seed", str(args.seed)]
    if args.depth is not None:
        cmd += ["--depth", str(args.depth)]
    if args.cut:
        cmd += ["--cut", f"{args.cut.block}:{args.cut.keep}"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += [f"--ort-set={item}" for item in args.ort_set]
    cmd += ["--no-arena"] * args.no_arena + ["--no-mem-pattern"] * args.no_mem_pattern + ["--as-before"] * args.as_before
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", default="896x896", help="HxW in pixels, multiples of 28")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-3B-Instruct", help="a Qwen2.5-VL entry of the configs")
    parser.add_argument("--depth", type=int, default=None, help="keep the first blocks only (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--threads", type=int, default=0, help="threads of both sides (default: each library's)")
    parser.add_argument("--reuse", action="store_true", help="keep the graph already exported to --out")
    parser.add_argument("--only", choices=["eager", "ort"], default=None, help="run one side (with --reuse)")
    parser.add_argument("--ort-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an ONNX Runtime session config entry for the ORT side (repeatable)")
    parser.add_argument("--no-arena", action="store_true", help="ORT side: no CPU memory arena")
    parser.add_argument("--as-before", action="store_true",
                        help="ORT side: open the tower as any graph (shared weights, no prepacking, planner reuse)")
    parser.add_argument("--no-mem-pattern", action="store_true", help="ORT side: no memory pattern")
    parser.add_argument("--cut", default=None, metavar="BLOCK:KEEP", help="export and run the tower with a vision cut")
    parser.add_argument("--child", choices=["export", "eager", "ort"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    h, w = (int(x) for x in args.image_size.lower().split("x"))
    if h % 28 or w % 28:
        raise SystemExit(f"--image-size {args.image_size}: both sides must be multiples of 28 (patch 14, merge 2)")
    args.size = (h, w)
    if args.cut:
        from halfv_export.graphs.pruning import VisionCut

        from halfv_export.base.errors import BadInput

        try:
            args.cut = VisionCut.parse(args.cut)
        except BadInput as e:
            raise SystemExit(str(e)) from None
    if args.child:
        result = {"export": export, "eager": run_eager, "ort": run_ort}[args.child](args)
        result.setdefault("peak_rss_gib", peak_rss_gib())
        if args.child == "export":  # what --reuse reads back
            (args.work / "export.json").write_text(json.dumps(result))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(args.out or tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        reused = args.reuse and (args.work / "export.json").exists()
        exported = json.loads((args.work / "export.json").read_text()) if reused else child("export", args)
        if args.only:
            print(json.dumps(child(args.only, args)))
            return
        eager = child("eager", args)
        ort = child("ort", args)
        import numpy as np

        a, b = np.load(args.work / "eager.npy"), np.load(args.work / "ort.npy")
        report = {
            "model": args.model, "weights": "random (seed %d), fp32" % args.seed, "image_size": args.image_size,
            "depth": args.depth or "published", "patches": exported["patches"], "threads": args.threads or "default",
            "export": exported, "eager": eager, "ort": ort,
            "ort_over_eager_time": ort["seconds"] / eager["seconds"],
            "ort_over_eager_rss": ort["peak_rss_gib"] / eager["peak_rss_gib"],
            "max_abs_diff": float(np.abs(a - b).max()), "max_abs_eager": float(np.abs(a).max()),
        }
        if args.cut:
            report["cut"] = {"block": args.cut.block, "keep": args.cut.keep, "tokens": int(a.shape[0]),
                             "same_tokens": bool(np.array_equal(np.load(args.work / "eager_tokens.npy"),
                                                                np.load(args.work / "ort_tokens.npy")))}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
