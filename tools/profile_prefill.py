"""Where an exported prefill graph spends its time: ONNX Runtime's own per-node profile of a run (the median of several),
summed by op type (and the largest single nodes), on the same random-weight 0.5B-class LLM and inputs `halfv-export bench` times.

    PYTHONPATH=. python tools/profile_prefill.py --visual 4096 --out /tmp/profile4096
    PYTHONPATH=. python tools/profile_prefill.py --visual 4096 --graph full --out /tmp/profile4096

The HalfV graph's selection (scores, farthest-point fill, gathers) is also reported as its own graph, as bench does.
GFLOP/s per op type uses measure.flops' counts only for the whole graph; per-op rows are times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

from halfv_export.engines.ort import graph_session, session_options
from halfv_export.graphs import get_adapter
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.graphs.specs import prefill_spec, selection_spec
from halfv_export.benchmarks.bench import BenchShape, bench_inputs, bench_model, feeds_of
from halfv_export.measure.flops import LMShape, prefill_flops


def profile(path: Path, feeds: dict, out: Path, runs: int = 4) -> tuple[dict, list, float]:
    """`runs` profiled runs after one warm-up -> ({op type: ms}, [(ms, node, op type)], run ms), every figure the
    median over the runs (single runs of a 6 s graph on this box vary by tens of ms per node: page faults of fresh
    buffers, the other thread's scheduling)."""
    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(out / path.stem)
    session = graph_session(path, options)[0]
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    for _ in range(runs + 1):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("name") == "model_run"][1:]  # the warm-up is left out
    per_node, op_of = defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= model_runs[0]["ts"]:
            name = e["name"][: -len("_kernel_time")]
            per_node[name].append(e["dur"] / 1000)
            op_of[name] = e["args"].get("op_name", "?")
    by_type = defaultdict(float)
    nodes = []
    for name, times in per_node.items():
        ms = statistics.median(times)
        by_type[op_of[name]] += ms
        nodes.append((ms, name, op_of[name]))
    return dict(by_type), sorted(nodes, reverse=True), statistics.median(e["dur"] / 1000 for e in model_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual", type=int, default=4096)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--graph", choices=["halfv", "full"], default="halfv")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--runs", type=int, default=4, help="Profiled runs after one warm-up (medians reported).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = get_adapter("qwen2.5-vl")
    shape = BenchShape()
    config, _, stack = bench_model(adapter, shape)
    sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
    inputs, _ = bench_inputs(adapter, config, stack, args.visual, args.text)
    halfv = args.graph == "halfv"
    spec = prefill_spec(stack, sched if halfv else None, args.visual if halfv else 0, label=f"n{args.visual}")
    path = spec.export(args.out)
    by_type, nodes, run_ms = profile(path, feeds_of(inputs), args.out, args.runs)
    f = prefill_flops(LMShape.from_config(config.to_dict()), args.visual, args.text, sched)
    flops = f.halfv + f.overhead if halfv else f.full
    total = sum(by_type.values())
    report = {"graph": path.name, "visual": args.visual, "runs": args.runs, "run_ms": round(run_ms, 1),
              "node_ms": round(total, 1),
              "gflop": round(flops / 1e9, 1), "gflop_per_s": round(flops / run_ms / 1e6, 1),
              "threads": os.cpu_count(),
              "by_op_type": {k: round(v, 1) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
              "top_nodes": [{"ms": round(ms, 2), "node": name, "op": op} for ms, name, op in nodes[:args.top]]}
    if halfv:
        sel = selection_spec(stack, sched, args.visual, f"n{args.visual}", inputs.positions,
                             int(inputs.visual_start[0]))
        sel_types, sel_nodes, sel_ms = profile(sel.export(args.out),
                                               dict(zip(sel.input_names, (t.numpy() for t in sel.example))), args.out,
                                               args.runs)
        report["selection"] = {"run_ms": round(sel_ms, 1),
                               "by_op_type": {k: round(v, 1) for k, v in sorted(sel_types.items(),
                                                                                key=lambda kv: -kv[1])},
                               "top_nodes": [{"ms": round(ms, 2), "node": name, "op": op}
                                             for ms, name, op in sel_nodes[:args.top]]}
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
