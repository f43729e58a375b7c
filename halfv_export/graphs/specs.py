"""One declarative description per graph kind: its file name, the module, example inputs, I/O names, dynamic dims
and which weights it holds. `export`, `bench`, the TensorRT build plan and the runners all read these. The graph
kinds and their file names live in base/artifact_files.py (torch-free, so the runtime install can name the graphs it
runs) and are re-exported here.

    embed           embed.onnx              input_ids [B, S] -> embeds [B, S, D]
    vision          vision_{label}.onnx     pixel input of one image of the bucket -> visual features [N, D]
    prefill         prefill_{label}.onnx    HalfV prefill for N = N(bucket): IVR + SSR as TopK / ArgMax / Gather
    prefill_full    prefill_full.onnx       the unpruned prefill (any N), for comparison and text-only prompts
    decode          decode.onnx             one token over the pruned cache (one valid mask per cache-length group)
    decode_full     decode_full.onnx        one token over the unpruned cache
    selection       selection_{label}.onnx  the selection work alone (bench: its share of the HalfV prefill)

`label` is the bucket as HxW (448x448), or any tag a caller gives (bench: n1024).
Example inputs are synthetic with the right shapes: batch 2 (so the batch dim stays symbolic), one sample left-padded,
the visual block at different rows per sample. Values never shape the trace; tests compare every graph with eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from ..base.artifact_files import (DECODE, DECODE_FULL, EMBED, PREFILL, PREFILL_FULL, PREFILL_INPUTS,  # noqa: F401
                                   SELECTION, VISION, VISION_FULL, GraphKind, bucket_label)
from .adapter import TextStack
from .export_forward import DecodeGraph, PrefillGraph, SelectionGraph
from .onnx_export import batch_dim, export_module, seq_dim
from .pruning import PruneSchedule, VisionCut


@dataclass
class GraphSpec:
    kind: GraphKind
    file: str
    module: nn.Module
    example: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple | None

    def export(self, directory: Path, store=None, report=lambda phase, detail: None, quantize=None) -> Path:
        """Trace to ONNX at directory/file and run the graph checks (onnx_export.check_graph); with a WeightStore the
        weights go to its shared file (graphs/shared_weights.py); with a quantize scheme (graphs/quantize.py) the
        weight MatMuls are quantised first."""
        return export_module(self.module, self.example, Path(directory) / self.file, self.input_names,
                             self.output_names, self.dynamic_shapes, store=store, report=report, quantize=quantize)


# ------------------------------------------------------------------------------------------------ example inputs
def prefill_example(stack: TextStack, num_visual: int, text: int = 8, dtype: torch.dtype | None = None) -> tuple:
    """(embeds [2, S, D], attention_mask [2, S], positions [P, 2, S], visual_start [2]) with S = N + text:
    sample 0 unpadded with its visual block at row 3, sample 1 left-padded by 2 with its block at row 5."""
    dtype = dtype or stack.embed_tokens.weight.dtype
    seq = num_visual + text
    g = torch.Generator().manual_seed(0)
    embeds = (torch.randn(2, seq, stack.embed_tokens.embedding_dim, generator=g) * 0.02).to(dtype)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :2] = 0
    rows = 3 if stack.mrope else 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(rows, -1, -1).contiguous()
    start = torch.tensor([3, 5]) if num_visual > 0 else torch.zeros(2, dtype=torch.long)
    return embeds, mask, positions, start


# ------------------------------------------------------------------------------------------------ specs
def embed_spec(stack: TextStack) -> GraphSpec:
    ids = torch.zeros((2, 8), dtype=torch.long)
    return GraphSpec(EMBED, EMBED.file(), stack.embed_tokens, (ids,), ["input_ids"], ["embeds"],
                     ({0: batch_dim(), 1: seq_dim(4)},))


def vision_spec(module: nn.Module, pixels: torch.Tensor, bucket: tuple[int, int], kind: GraphKind = VISION) -> GraphSpec:
    """The adapter's static-shape vision graph for one bucket, traced on one image's pixel input. A tower with a
    vision cut (graphs/vision_cut.py) also returns the raster indices of the tokens it kept. `kind` VISION_FULL: a
    cut build's uncut tower, which `--full` runs."""
    outputs = ["visual_features"] + (["visual_tokens"] if isinstance(getattr(module, "cut", None), VisionCut) else [])
    return GraphSpec(kind, kind.file(bucket), module, (pixels,), ["pixel_values"], outputs, None)


def prefill_spec(stack: TextStack, schedule: PruneSchedule | None, num_visual: int,
                 label: str | tuple[int, int] | None = None) -> GraphSpec:
    """HalfV prefill for N = num_visual (schedule given), or the unpruned prefill (schedule None)."""
    pruned = schedule is not None
    graph = PrefillGraph(stack, schedule, num_visual if pruned else 0).eval()
    example = prefill_example(stack, num_visual if pruned else 0)
    b, s = batch_dim(), seq_dim(num_visual + 2 if pruned else 4)
    kind = PREFILL if pruned else PREFILL_FULL
    return GraphSpec(kind, kind.file(label), graph, example, list(PREFILL_INPUTS), graph.output_names(),
                     ({0: b, 1: s}, {0: b, 1: s}, {1: b, 2: s}, {0: b}))


def decode_spec(stack: TextStack, groups: list[int], pruned: bool) -> GraphSpec:
    """One decode step over caches whose layers fall into len(set(groups)) length groups; each group's past length
    is its own dynamic dim and its valid mask is past + 1 long."""
    graph = DecodeGraph(stack, groups).eval()
    dtype = stack.embed_tokens.weight.dtype
    b = batch_dim()
    n_groups = len(set(groups))
    past_dims = [Dim(f"past_{g}", min=2, max=32768) for g in range(n_groups)]
    lengths = [7 + 3 * g for g in range(n_groups)]  # distinct example lengths keep the groups' dims apart
    ids = torch.zeros((2, 1), dtype=torch.long)
    positions = torch.full((3 if stack.mrope else 1, 2, 1), 9, dtype=torch.long)
    valids = [torch.ones((2, lengths[g] + 1), dtype=torch.long) for g in range(n_groups)]
    past = []
    for i in range(stack.num_layers):
        shape = (2, stack.num_kv_heads, lengths[groups[i]], stack.head_dim)
        past += [torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)]
    rest = [{0: b, 1: past_dims[g] + 1} for g in range(n_groups)]
    rest += [{0: b, 2: past_dims[groups[i]]} for i in range(stack.num_layers) for _ in range(2)]
    kind = DECODE if pruned else DECODE_FULL
    return GraphSpec(kind, kind.file(), graph, (ids, positions, *valids, *past), graph.input_names(),
                     graph.output_names(), ({0: b}, {1: b}, tuple(rest)))  # forward(input_ids, positions, *rest)


def selection_spec(stack: TextStack, schedule: PruneSchedule, num_visual: int, label: str,
                   positions: torch.Tensor, start: int) -> GraphSpec:
    """The selection work alone at N = num_visual with the visual block at row `start`, static shapes, traced on
    random hidden states at `positions` [P, 1, S] (its example is its benchmark input). In topk mode the SSR cut reads
    its own states, the inputs of layers L2-1 and L2 of the IVR-compacted sequence [1, S - N + K1, D]."""
    seq = positions.shape[-1]
    g = torch.Generator().manual_seed(1)
    dtype = stack.embed_tokens.weight.dtype
    dim = stack.embed_tokens.embedding_dim
    graph = SelectionGraph(stack, schedule, num_visual).eval()
    h_prev, h = (torch.randn(1, seq, dim, generator=g).to(dtype) for _ in range(2))
    cos, sin = stack.rotary(h, positions)
    example = (h_prev, h, cos, sin, torch.ones(1, seq, dtype=torch.long), torch.tensor([start]))
    if graph.topk:
        compacted = seq - num_visual + graph.plan.k1
        example += tuple(torch.randn(1, compacted, dim, generator=g).to(dtype) for _ in range(2))
    return GraphSpec(SELECTION, SELECTION.file(label), graph, example, graph.input_names(), graph.output_names(), None)
