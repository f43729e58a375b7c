"""The TensorRT build plan as plain data: which graphs, which optimisation profiles (min/opt/max per dynamic
input), which flags and precision, where engines and the timing cache go, and the equivalent trtexec lines.
Computed from artifacts.json and the graphs' own input shapes; the TensorRT calls in trt.py only apply it.

Profiles: one per image-size bucket (N fixed by the bucket, text length T in [min, opt, max]); the unpruned
prefill and decode graphs also get a text-only profile. Decode past lengths per cache group follow the bucket:
group 0 holds N+T rows, group 1 K1+T, group 2 K2+T, each growing by up to max_new_tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import sympy

from ..base.artifact_files import DECODE, DECODE_FULL, EMBED, PREFILL_FULL, TRT_DIR
from ..base.errors import BadInput
from ..base.manifest import sha256_file
from ..host.inputs import PAD_MULTIPLE


@dataclass(frozen=True)
class PlanOptions:
    max_batch: int = 4
    min_text: int = 8
    opt_text: int = 64
    max_text: int = 512
    max_new_tokens: int = 512
    workspace_mib: int = 4096

    def check(self) -> "PlanOptions":
        if not 1 <= self.min_text <= self.opt_text <= self.max_text:
            raise BadInput(f"text lengths need 1 <= min ({self.min_text}) <= opt ({self.opt_text}) <= max ({self.max_text})")
        if self.max_batch < 1 or self.max_new_tokens < 1 or self.workspace_mib < 64:
            raise BadInput("max batch and max new tokens must be >= 1, the workspace >= 64 MiB")
        return self


@dataclass
class GraphPlan:
    graph: str
    engine: str
    onnx_sha256: str
    profiles: list[dict]  # each: input name -> [min shape, opt shape, max shape]
    strongly_typed: bool = True
    flags: list[str] = field(default_factory=list)  # BuilderFlag names, never integers
    workspace_mib: int = 4096


@dataclass
class TrtBuildPlan:
    precision: str  # the exported graphs' precision; strongly typed builds keep it (scores, norms, softmax in fp32)
    timing_cache: str
    graphs: list[GraphPlan]
    options: PlanOptions

    def to_dict(self) -> dict:
        return asdict(self)


def _ranges(options: PlanOptions, visual: int, kept: list[int], decode: bool,
            slack: int = 0) -> dict[str, tuple[int, int, int]]:
    """Symbol -> (min, opt, max) for one bucket; kept = rows of visual tokens left per cache group. `slack`: rows
    the maximum allows beyond the text (a vision cut's rows are re-aligned to PAD_MULTIPLE: up to 15 more)."""
    grow = options.max_new_tokens if decode else 0
    text = (options.min_text, options.opt_text, options.max_text + grow + slack)
    ranges = {"batch": (1, 1, options.max_batch), "seq": tuple(visual + t for t in text)}
    for g, k in enumerate(kept):
        ranges[f"past_{g}"] = tuple(k + t for t in text)
    return ranges


def _input_shapes(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _profile(shapes: dict[str, list], ranges: dict[str, tuple[int, int, int]]) -> dict:
    """Evaluate each input's symbolic dims ('seq', 'past_0 + 1') at min / opt / max; static inputs are skipped."""
    profile = {}
    for name, dims in shapes.items():
        if all(isinstance(d, int) for d in dims):
            continue
        triple = []
        for which in range(3):
            values = {sym: r[which] for sym, r in ranges.items()}
            shape = []
            for d in dims:
                if isinstance(d, int):
                    shape.append(d)
                    continue
                expr = sympy.sympify(d)
                missing = {str(s) for s in expr.free_symbols} - set(values)
                if missing:
                    raise BadInput(f"input {name} has dimension '{d}' with unknown symbols {sorted(missing)}; "
                                   "re-export with this version of halfv-export")
                shape.append(int(expr.subs(values)))
            triple.append(shape)
        profile[name] = triple
    return profile


def make_plan(artifacts: Path, options: PlanOptions = PlanOptions()) -> TrtBuildPlan:
    options.check()
    artifacts = Path(artifacts)
    meta = json.loads((artifacts / "artifacts.json").read_text())
    buckets = meta["buckets"]
    groups = meta["groups"]
    n_groups = len(set(groups))
    graphs = []

    def add(graph: str, profile_ranges: list[dict]):
        shapes = _input_shapes(artifacts / graph)
        profiles = [p for p in (_profile(shapes, r) for r in profile_ranges) if p]
        graphs.append(GraphPlan(graph=graph, engine=f"{TRT_DIR}/{Path(graph).stem}.plan",
                                onnx_sha256=sha256_file(artifacts / graph), profiles=profiles,
                                workspace_mib=options.workspace_mib))

    def kept(b):  # visual rows the HalfV prefill takes: K after a vision cut, else N
        return b.get("kept_visual", b["num_visual"])

    def slack(b):  # the cut rows' re-alignment (host/inputs.cut_rows) may add up to PAD_MULTIPLE - 1 pad rows
        return PAD_MULTIPLE - 1 if kept(b) != b["num_visual"] else 0

    def kept_rows(b):  # visual rows left per cache-length group of the pruned decode graph
        return [kept(b), b["k1"], b["k2"]][:n_groups]

    text_only = _ranges(options, 0, [0], decode=False)
    longest = max(b["num_visual"] for b in buckets)
    add(EMBED.file(), [{"batch": (1, 1, options.max_batch),
                        "seq": (options.min_text, longest + options.opt_text, longest + options.max_text)}])
    for b in buckets:
        add(b["vision"], [{}])
        if b.get("vision_full", b["vision"]) != b["vision"]:  # a cut build's uncut tower, for --full
            add(b["vision_full"], [{}])
        add(b["prefill"], [_ranges(options, kept(b), [], False, slack(b))])
    add(PREFILL_FULL.file(), [_ranges(options, b["num_visual"], [], False) for b in buckets] + [text_only])
    add(DECODE.file(), [_ranges(options, kept(b), kept_rows(b), True, slack(b)) for b in buckets])
    add(DECODE_FULL.file(), [_ranges(options, b["num_visual"], [b["num_visual"]], True) for b in buckets]
        + [_ranges(options, 0, [0], True)])
    return TrtBuildPlan(precision=meta.get("precision", "fp32"), timing_cache=f"{TRT_DIR}/timing.cache",
                        graphs=graphs, options=options)


def _shape_spec(profile: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(v) for v in shapes[which])}" for name, shapes in profile.items())


def trtexec_command(plan: TrtBuildPlan, graph: GraphPlan) -> str:
    """The equivalent trtexec line (no per-integer flags). trtexec (samples/common/sampleOptions.cpp) takes one
    --minShapes/--optShapes/--maxShapes set on its own; several profiles each need a `--profile=N` right before
    their three shape options, with N counting from 0 (without it, a second set is refused)."""
    parts = ["trtexec", f"--onnx={graph.graph}", f"--saveEngine={graph.engine}",
             f"--memPoolSize=workspace:{graph.workspace_mib}M", f"--timingCacheFile={plan.timing_cache}"]
    if graph.strongly_typed:
        parts.append("--stronglyTyped")
    numbered = len(graph.profiles) > 1
    for index, profile in enumerate(graph.profiles):
        if numbered:
            parts.append(f"--profile={index}")
        parts += [f"{flag}={_shape_spec(profile, which)}"
                  for which, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes"))]
    return " ".join(parts)


def trtexec_lines(artifacts: Path, options: PlanOptions | None = None) -> dict:
    """The build plan's trtexec lines, for the manifest (computed without TensorRT)."""
    plan = make_plan(artifacts, options or PlanOptions())
    return {"trtexec": {g.graph: trtexec_command(plan, g) for g in plan.graphs}}
