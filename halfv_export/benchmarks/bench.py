"""`halfv-export bench`: speed, memory and FLOPs side by side, in one process, on the same inputs.

Sections (bench.json keys):
  flops_curves   analytic full/HalfV ratio for the published configs, N = 576 .. 16384 (paper schedules)
  cpu_prefill    exported full vs HalfV prefill in ONNX Runtime CPU on a random-weight LLM of the backbone's family
                 (default: Qwen2.5-VL at the 0.5B class; --config reads published widths) for each N: medians, ratio,
                 FLOPs ratio, efficiency = measured / FLOPs ratio
  eager          at the reference N: eager PyTorch unpruned and HalfV prefill on the same inputs
  selection      at the reference N: the selection work alone (scores, farthest-point fill, gathers) as its own graph
  ttft           at the reference N: time to first token = embedding + vision tower (the published one, random
                 weights) + prefill, full vs HalfV, exported and eager, beside the LLM-only ratio and both FLOPs ratios;
                 with --vision-cut also HalfV behind the cut tower (its graph timed, the HalfV prefill on its K rows)
  genai          ONNX Runtime GenAI's model builder on the same checkpoint, its unpruned prefill on the same ids
  decode         one decode step, full vs HalfV cache, and the KV-cache bytes of each
  gpu            eager bf16 prefill on the backbone's published 7B LLM shape when CUDA is present (skipped otherwise)
The graphs timed are the product's own (graphs/specs.py), exported by the same code path as `export`.
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

from ..base.atomic import prepare_out_dir, write_text_atomic
from ..base.errors import BadInput
from ..engines.ort import graph_session, run_options_for
from ..graphs.adapter import BackboneAdapter, LoadedModel, PrefillInputs, adapter_for_model_type
from ..graphs.checkpoint import read_config_json, seeded_model
from ..graphs.halfv import HalfVReference
from ..graphs.pruning import PruneSchedule, VisionCut
from ..graphs.shared_weights import WeightStore, parameter_names
from ..graphs.specs import decode_spec, prefill_spec, selection_spec
from ..measure.flops import LMShape, prefill_flops
from ..measure.report import timed

CONFIGS = Path(__file__).parent / "data" / "model-configs.json"
CURVE_POINTS = (576, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class BenchShape:
    """The LLM shape timed; the default is the 0.5B class (Qwen2-0.5B's widths)."""

    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936

    @classmethod
    def from_config(cls, path: Path, **overrides) -> "BenchShape":
        """Published widths from a HF config.json (text_config or flat); flags that are not None win."""
        lm = LMShape.from_config(read_config_json(path))
        shape = cls(hidden=lm.hidden, layers=lm.layers, heads=lm.heads, kv_heads=lm.kv_heads,
                    intermediate=lm.intermediate, vocab=lm.vocab)
        return cls(**{**asdict(shape), **{k: v for k, v in overrides.items() if v is not None}})

    def text_config(self) -> dict:
        return dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                    max_position_embeddings=32768, tie_word_embeddings=False)


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
    """A CPU session of one graph, opened the way the onnxruntime engine opens it."""
    return graph_session(Path(path))[0]


def measure_ort(path: Path, feeds: dict, runs: int, outputs: list[str] | None = None) -> dict:
    """A CPU session as the onnxruntime engine opens it (causal attention fused where marked) -> timings, RSS
    and how many attention sites ran fused."""
    with PeakRss() as rss:
        session, fused = graph_session(Path(path))
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        run_options = run_options_for(session)
        result = timed(lambda: session.run(outputs, feeds, run_options), runs)
    return {**result, **rss.result(), **({"fused_attention": fused} if fused else {})}


# ------------------------------------------------------------------------------------------------ model
def bench_model(adapter: BackboneAdapter, shape: BenchShape, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    """A random-weight VLM of the backbone's family whose LLM has `shape` (the vision tower stays the embedded one:
    it is not timed here) -> (config, model, text stack)."""
    config = adapter.synthetic_config(shape.text_config())
    if device == "cpu":
        model = seeded_model(adapter.model_class, config, seed=seed)
    else:
        with torch.device(device):
            model = adapter.model_class(config).to(dtype).eval()
    stack = adapter.text_stack(LoadedModel(model=model, tokenizer=None, image_processor=None, source="bench"))
    return config, model, stack


def bench_inputs(adapter: BackboneAdapter, config, stack, visual: int, text: int,
                 seed: int = 0) -> tuple[PrefillInputs, torch.Tensor]:
    """One prompt: `text` ordinary tokens around an h x w grid of `visual` merged image tokens, the most square
    factorisation (2048 -> 32 x 64), with RoPE positions as the model computes them. Visual embeddings are random
    features; returns the inputs and the token ids (random text ids; the peer graph sees ids only)."""
    rows = max(d for d in range(1, int(visual ** 0.5) + 1) if visual % d == 0)
    g = torch.Generator().manual_seed(seed)
    before = text // 3
    ids = torch.randint(0, stack.vocab_size - 8, (1, text + visual), generator=g)
    positions = adapter.prompt_positions(config, before, (rows, visual // rows), text - before)  # [P, 1, S]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        embeds = stack.embed_tokens(ids)
        embeds[:, before:before + visual] = torch.randn(1, visual, embeds.shape[-1], generator=g).to(embeds.dtype) * 0.05
    inputs = PrefillInputs(input_ids=ids, embeds=embeds, attention_mask=mask, positions=positions,
                           visual_start=torch.tensor([before]), num_visual=visual,
                           next_positions=positions.max(dim=2).values + 1)
    return inputs, ids


def feeds_of(inputs: PrefillInputs) -> dict:
    return {"embeds": inputs.embeds.numpy(), "attention_mask": inputs.attention_mask.numpy(),
            "positions": inputs.positions.numpy(), "visual_start": inputs.visual_start.numpy()}


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
        elif name == "position_ids":  # [3, B, S] for M-RoPE graphs, [B, S] otherwise
            feeds[name] = positions.numpy() if len(info.shape) == 3 else positions[0].numpy()
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


def published_shape(adapter: BackboneAdapter) -> tuple[str, BenchShape] | None:
    """The first published config of the backbone's family in model-configs.json (the 7B for Qwen and LLaVA)."""
    for model in json.loads(CONFIGS.read_text())["models"]:
        if model.get("model_type") in adapter.model_types:
            lm = LMShape.from_config(model)
            return model["_model"], BenchShape(hidden=lm.hidden, layers=lm.layers, heads=lm.heads,
                                               kv_heads=lm.kv_heads, intermediate=lm.intermediate, vocab=lm.vocab)
    return None


def gpu_section(adapter: BackboneAdapter, runs: int) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    name, shape = published_shape(adapter)
    config, _, stack = bench_model(adapter, shape, device="cuda", dtype=torch.bfloat16)
    sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
    rows = []
    for n in (1024, 4096):
        inputs, _ = bench_inputs(adapter, config, stack, n, 64)
        inputs = PrefillInputs(**{**inputs.__dict__, **{k: getattr(inputs, k).cuda() for k in (
            "input_ids", "embeds", "attention_mask", "positions", "visual_start", "next_positions")}})

        def run(schedule):
            HalfVReference(stack, schedule).prefill(inputs)
            torch.cuda.synchronize()

        full, halfv = timed(lambda: run(None), runs), timed(lambda: run(sched), runs)
        f = prefill_flops(LMShape.from_config(config.to_dict()), n, 64, sched)
        rows.append({"visual": n, "full_ms": full["median_ms"], "halfv_ms": halfv["median_ms"],
                     "measured_ratio": round(full["median_ms"] / halfv["median_ms"], 3), "flops_ratio": round(f.ratio, 3)})
    return {"device": torch.cuda.get_device_name(), "dtype": "bf16", "model": name, "shape": asdict(shape),
            "eager_prefill": rows}


# ------------------------------------------------------------------------------------------------ driver
def run_bench(out: Path, adapter: BackboneAdapter, shape: BenchShape = BenchShape(),
              visual: tuple[int, ...] = (256, 1024, 2048), text: int = 64, runs: int = 5, reference_visual: int = 1024,
              genai: bool = True, log: Callable[[str], None] = print, vision: bool = True,
              vision_depth: int | None = None, command: str = "halfv-export bench",
              vision_cut: VisionCut | None = None) -> dict:
    import onnxruntime as ort

    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise BadInput(f"--hidden {shape.hidden} / --heads {shape.heads} / --kv-heads {shape.kv_heads}: hidden must "
                       "divide by heads and heads by kv heads")
    if vision_cut is not None:  # before anything is built or written
        if not vision:
            raise BadInput("--vision-cut times the cut tower; drop --no-vision or the cut")
        tower = published_tower(adapter, vision_depth)
        if tower is None:
            raise BadInput(f"{adapter.name}: bench times a vision cut on a published windowed tower, and this "
                           "backbone has none; drop --vision-cut")
        adapter.check_vision_cut(adapter.config_class(**tower_config(adapter, shape, tower[1])), vision_cut)
    out = prepare_out_dir(out)
    work = out / "work"
    work.mkdir(exist_ok=True)
    log(f"building a random-weight {adapter.name} LLM: {shape}")
    config, model, stack = bench_model(adapter, shape)
    sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
    lm = LMShape.from_config(config.to_dict())
    result = {"backbone": adapter.name, "shape": asdict(shape), "schedule": asdict(sched), "text_tokens": text, "weights": "random",
              "device": f"CPU ({os.cpu_count()} cores), ONNX Runtime {ort.__version__} CPU, ORT_ENABLE_ALL, "
                        f"torch {torch.__version__}", "runs": runs, "flops_curves": flops_curves(text=text),
              "command": command, "load_average": {"start": round(os.getloadavg()[0], 2)}}

    inputs = {n: bench_inputs(adapter, config, stack, n, text) for n in sorted(set(visual) | {reference_visual})}
    log("exporting the unpruned prefill graph")
    full_path = prefill_spec(stack, None, 0).export(work)
    halfv_paths = {}
    rows = []
    for n in visual:
        log(f"N={n}: exporting the HalfV prefill graph and timing both")
        path = halfv_paths[n] = prefill_spec(stack, sched, n, label=f"n{n}").export(work)
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
    spec = selection_spec(stack, sched, reference_visual, f"n{reference_visual}", ref_inputs.positions,
                          int(ref_inputs.visual_start[0]))
    selection = measure_ort(spec.export(work), dict(zip(spec.input_names, (t.numpy() for t in spec.example))), runs)
    ref_row = next(r for r in rows if r["visual"] == reference_visual)
    selection["share_of_halfv_prefill"] = round(selection["median_ms"] / ref_row["halfv"]["median_ms"], 4)
    f = prefill_flops(lm, reference_visual, text, sched)
    selection["flops_share"] = round(f.overhead / f.halfv, 4)
    result["selection"] = selection

    if vision:
        cut_prefill = None
        if vision_cut is not None:
            k = vision_cut.tokens(reference_visual)
            log(f"N={reference_visual}: exporting the HalfV prefill graph on the cut's {k} rows and timing it")
            cut_inputs = bench_inputs(adapter, config, stack, k, text)[0]
            cut_prefill = {"visual": k, "halfv": measure_ort(prefill_spec(stack, sched, k, label=f"k{k}").export(work),
                                                             feeds_of(cut_inputs), runs, ["logits"])}
            with torch.no_grad():
                cut_prefill["eager_halfv"] = timed(lambda: HalfVReference(stack, sched).prefill(cut_inputs), runs)
        result["ttft"] = ttft_section(adapter, shape, lm, sched, reference_visual, text, ref_row, result["eager"],
                                      work, runs, vision_depth, log, vision_cut, cut_prefill)
    else:
        result["ttft"] = {"skipped": "--no-vision"}

    log(f"N={reference_visual}: decode step on the full and the pruned cache")
    result["decode"] = decode_section(stack, sched, ref_inputs, full_path, halfv_paths[reference_visual], work, runs)

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
    result["gpu"] = gpu_section(adapter, runs)
    result["load_average"]["end"] = round(os.getloadavg()[0], 2)  # other work on the box inflates every time
    write_text_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    from .report import render_bench, bench_plots

    bench_plots(result, out)
    write_text_atomic(out / "bench.md", render_bench(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def decode_section(stack, sched, inputs: PrefillInputs, full_path: Path, halfv_path: Path, work: Path,
                   runs: int) -> dict:
    """One decode step after each prefill, on the caches that prefill produced: the product's decode graphs."""
    layers = stack.num_layers
    section = {}
    for name, pruned, prefill_path in (("full", False, full_path), ("halfv", True, halfv_path)):
        session = ort_session(prefill_path)
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds_of(inputs))))
        del session
        past = [outs[f"present_{kind}_{i}"] for i in range(layers) for kind in ("key", "value")]
        spec = decode_spec(stack, sched.cache_groups(layers) if pruned else [0] * layers, pruned=pruned)
        path = spec.export(work)
        feeds = decode_feeds(spec.input_names, layers, inputs, outs)
        section[name] = {**measure_ort(path, feeds, runs, ["logits"]),
                         "kv_cache_bytes": int(sum(p.nbytes for p in past)),
                         "cache_lengths": sorted({int(p.shape[2]) for p in past})}
    section["kv_cache_ratio"] = round(section["full"]["kv_cache_bytes"] / section["halfv"]["kv_cache_bytes"], 3)
    return section


def decode_feeds(input_names: list[str], layers: int, inputs: PrefillInputs, outs: dict) -> dict:
    """One decode step's feeds after a prefill whose outputs are `outs`: token 7, the next positions, each cache
    group's valid mask grown by one, and the prefill's present K/V as the past (the decode graph's last 2L inputs)."""
    past = [outs[f"present_{kind}_{i}"] for i in range(layers) for kind in ("key", "value")]
    valid = [outs[k] for k in sorted(k for k in outs if k.startswith("cache_valid_"))]
    feeds = {"input_ids": np.array([[7]]), "positions": inputs.next_positions[..., None].numpy()}
    feeds.update({f"cache_valid_{g}": np.concatenate([v, np.ones((1, 1), dtype=v.dtype)], 1)
                  for g, v in enumerate(valid)})
    feeds.update({n: p for n, p in zip(input_names[-2 * layers:], past)})
    return feeds


def published_vision(adapter: BackboneAdapter) -> tuple[str, dict] | None:
    for model in json.loads(CONFIGS.read_text())["models"]:
        if model.get("model_type") in adapter.model_types and model.get("vision_config"):
            return model["_model"], dict(model["vision_config"])
    return None


def published_tower(adapter: BackboneAdapter, vision_depth: int | None) -> tuple[str, dict] | None:
    """The backbone's published windowed tower (name, vision_config), cut to its first `vision_depth` blocks when
    given; None where it has none (a CLIP tower's image size does not set N)."""
    found = published_vision(adapter)
    if found is None or "window_size" not in found[1]:
        return None
    name, vision = found
    if vision_depth is not None:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
    return name, vision


def tower_config(adapter: BackboneAdapter, shape: BenchShape, vision: dict) -> dict:
    """A one-layer LLM of the bench's width behind the published tower: the tower alone is timed."""
    return adapter.synthetic_config_dict({**shape.text_config(), "num_hidden_layers": 1},
                                         {k: v for k, v in vision.items() if k != "out_hidden_size"})


def ttft_section(adapter: BackboneAdapter, shape: BenchShape, lm: LMShape, sched: PruneSchedule, visual: int,
                 text: int, prefill_row: dict, eager: dict, work: Path, runs: int, vision_depth: int | None,
                 log: Callable[[str], None], cut: VisionCut | None = None, cut_prefill: dict | None = None) -> dict:
    """Time to first token at N = `visual`: embedding + vision tower + prefill, full vs HalfV, exported (ONNX
    Runtime) and eager, as the sum of the stage medians (the stages run one after another; the prefill rows are the
    cpu_prefill / eager rows of the same N). The tower is the backbone's published one (fp32, random weights; its
    first `vision_depth` blocks when given) with its merger emitting this LLM's width, on one image whose merged
    grid is the bench prompt's (as square as N allows); its graph is the product's (adapter.vision_graph).

    With a vision cut, the cut tower's graph is timed too, and HalfV behind it is embedding + cut tower + the HalfV
    prefill on its K rows (`cut_prefill`, timed by run_bench) -> the "cut" entry."""
    import copy

    from ..graphs.specs import embed_spec, vision_spec
    from ..measure.vision_flops import vision_flops

    found = published_tower(adapter, vision_depth)
    if found is None:
        return {"skipped": f"{adapter.name}: no published windowed vision tower whose image size sets N"}
    name, vision = found
    cfg = tower_config(adapter, shape, vision)
    config = adapter.config_class(**copy.deepcopy(cfg))
    log(f"N={visual}: building the published vision tower ({name}, depth {vision['depth']}, random weights)")
    model = seeded_model(adapter.model_class, config, seed=0)
    processing = adapter.load_processing(adapter.embedded_dir, config=config)
    ip = processing.image_processor
    side = ip.patch_size * ip.merge_size
    rows = max(d for d in range(1, int(visual ** 0.5) + 1) if visual % d == 0)
    bucket = (rows * side, visual // rows * side)
    loaded = LoadedModel(model=model, tokenizer=None, image_processor=ip, source="bench")
    patches = visual * ip.merge_size ** 2
    pixels = torch.randn(patches, 3 * ip.temporal_patch_size * ip.patch_size ** 2,
                         generator=torch.Generator().manual_seed(2))
    log(f"N={visual}: exporting the vision graph of the {bucket[0]}x{bucket[1]} bucket and timing it")

    def export_tower(module: nn.Module, folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        store = WeightStore(folder, parameter_names(model))  # weights.bin beside the graph, as export writes it
        try:
            return vision_spec(module, pixels, bucket).export(folder, store=store)
        finally:
            store.close()

    graph = export_tower(adapter.vision_graph(loaded, bucket), work / "vision")
    vision_ort = measure_ort(graph, {"pixel_values": pixels.numpy()}, runs)
    with torch.no_grad(), PeakRss() as rss:
        vision_eager = timed(lambda: adapter.eager_vision(loaded, pixels, bucket), runs)
    vision_eager.update(rss.result())
    cut_tower = None
    if cut is not None:
        log(f"N={visual}: exporting the cut vision graph (after block {cut.block}, keep {cut.keep:g}) and timing it")
        cut_graph = export_tower(adapter.vision_graph(loaded, bucket, cut), work / "vision-cut")
        cut_tower = {"ort": measure_ort(cut_graph, {"pixel_values": pixels.numpy()}, runs)}
        with torch.no_grad():
            cut_tower["eager"] = timed(lambda: adapter.eager_vision_cut(loaded, pixels, bucket, cut), runs)
    del model, loaded
    stack = adapter.text_stack(LoadedModel(model=seeded_model(adapter.model_class, config, seed=0), tokenizer=None,
                                           image_processor=None, source="bench"))
    ids = torch.randint(0, shape.vocab, (1, visual + text), generator=torch.Generator().manual_seed(3))
    embed = measure_ort(embed_spec(stack).export(work), {"input_ids": ids.numpy()}, runs)
    with torch.no_grad():
        embed_eager = timed(lambda: stack.embed_tokens(ids), runs)
    f = prefill_flops(lm, visual, text, sched)
    v = vision_flops(cfg, lm.hidden, visual, (rows, visual // rows))
    ms = lambda entry: entry["median_ms"]  # noqa: E731
    engine = {"full": ms(embed) + ms(vision_ort) + ms(prefill_row["full"]),
              "halfv": ms(embed) + ms(vision_ort) + ms(prefill_row["halfv"])}
    reference = {"full": ms(embed_eager) + ms(vision_eager) + ms(eager["full"]),
                 "halfv": ms(embed_eager) + ms(vision_eager) + ms(eager["halfv"])}
    section = {"visual": visual, "bucket": list(bucket), "tower": name, "vision_depth": vision["depth"],
            "vision_ort": vision_ort, "vision_eager": vision_eager, "embed_ort": embed, "embed_eager": embed_eager,
            "engine_ttft_ms": {k: round(x, 1) for k, x in engine.items()},
            "eager_ttft_ms": {k: round(x, 1) for k, x in reference.items()},
            "engine_ttft_ratio": round(engine["full"] / engine["halfv"], 3),
            "eager_ttft_ratio": round(reference["full"] / reference["halfv"], 3),
            "prefill_ratio": prefill_row["measured_ratio"], "halfv_prefill_ms": ms(prefill_row["halfv"]),
            "vision_flops": v.total, "vision_tflop": round(v.total / 1e12, 4), "flops_prefill_ratio": round(f.ratio, 3),
            "flops_ttft_ratio": round((v.total + f.full) / (v.total + f.halfv), 3)}
    if cut is not None:
        k = cut_prefill["visual"]
        v_cut = vision_flops(cfg, lm.hidden, visual, (rows, visual // rows), cut)
        f_cut = prefill_flops(lm, k, text, sched)
        cut_engine = ms(embed) + ms(cut_tower["ort"]) + ms(cut_prefill["halfv"])
        cut_eager = ms(embed_eager) + ms(cut_tower["eager"]) + ms(cut_prefill["eager_halfv"])
        section["cut"] = {
            "block": cut.block, "keep": cut.keep, "kept": k, "vision_ort": cut_tower["ort"],
            "vision_eager": cut_tower["eager"], "prefill_ort": cut_prefill["halfv"],
            "prefill_eager": cut_prefill["eager_halfv"], "engine_ttft_ms": round(cut_engine, 1),
            "eager_ttft_ms": round(cut_eager, 1), "engine_ttft_ratio": round(engine["full"] / cut_engine, 3),
            "eager_ttft_ratio": round(reference["full"] / cut_eager, 3),
            "vision_ratio": round(ms(vision_ort) / ms(cut_tower["ort"]), 3),
            "vision_flops": v_cut.total, "vision_tflop": round(v_cut.total / 1e12, 4),
            "flops_ttft_ratio": round((v.total + f.full) / (v_cut.total + f_cut.halfv), 3)}
    return section
