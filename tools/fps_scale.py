"""The HalfV prefill graph at scale: export time, node count, ONNX Runtime session time and run time at N visual
tokens, for the farthest-point-fill formulation in the product (`chain`: 4 nodes a step) and the literal one it
replaced (`reference`: 9 nodes a step). Both select the same indices (tests/test_pruning.py); this measures what the
unrolled K1 - A step chain costs (922 steps at N = 4096).

The LLM is random-weight and shallow on purpose (default: the 0.5B class widths, 4 layers, vocab 1024): the chain
does not depend on depth, and a shallow model shows what it costs beside the layers it saves. `selection` rows time
the selection graph alone (scores, anchors, the fill, gathers) at the same N.

    PYTHONPATH=. python tools/fps_scale.py --visual 1024 --visual 2304 --visual 4096
    PYTHONPATH=. python tools/fps_scale.py --visual 4096 --formulation chain --runs 3

Prints one JSON line per (graph, formulation, N) and writes them all to --out (JSON list) when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual", type=int, action="append", help="N (repeatable); default 1024, 2304, 4096")
    parser.add_argument("--formulation", action="append", choices=["chain", "reference"],
                        help="fill formulation(s) to measure (repeatable); default both")
    parser.add_argument("--graph", action="append", choices=["prefill", "selection"],
                        help="graph(s) to measure (repeatable); default both")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import onnx
    import torch

    from halfv_export.graphs import get_adapter, pruning
    from halfv_export.graphs.specs import prefill_spec, selection_spec
    from halfv_export.benchmarks.bench import BenchShape, bench_inputs, bench_model, feeds_of, ort_session
    from halfv_export.measure.report import timed

    adapter = get_adapter("qwen2.5-vl")
    shape = BenchShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate, vocab=args.vocab)
    config, _, stack = bench_model(adapter, shape)
    sched = pruning.PruneSchedule(**adapter.paper.at_depth(shape.layers))
    fills = {"chain": pruning.farthest_point_fill, "reference": pruning.farthest_point_fill_reference}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for n in args.visual or [1024, 2304, 4096]:
            inputs, _ = bench_inputs(adapter, config, stack, n, args.text)
            plan = pruning.budgets(n, sched)
            for name in args.formulation or ["chain", "reference"]:
                pruning.farthest_point_fill = fills[name]  # ivr_select reads the module global
                for graph in args.graph or ["prefill", "selection"]:
                    if graph == "prefill":
                        spec = prefill_spec(stack, sched, n, label=f"n{n}")
                        feeds = feeds_of(inputs)
                    else:
                        spec = selection_spec(stack, sched, n, f"n{n}", inputs.positions, int(inputs.visual_start[0]))
                        feeds = dict(zip(spec.input_names, (t.numpy() for t in spec.example)))
                    started = time.perf_counter()
                    path = spec.export(Path(tmp))
                    exported = time.perf_counter() - started
                    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
                    started = time.perf_counter()
                    session = ort_session(path)
                    created = time.perf_counter() - started
                    wanted = {i.name for i in session.get_inputs()}
                    run = timed(lambda: session.run(None, {k: v for k, v in feeds.items() if k in wanted}), args.runs)
                    row = {"graph": graph, "fill": name, "visual": n, "steps": plan.k1 - plan.anchors,
                           "export_s": round(exported, 1), "nodes": sum(ops.values()), "argmax": ops["ArgMax"],
                           "session_s": round(created, 1), **run}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    del session
                    path.unlink()
                    Path(f"{path}.data").unlink(missing_ok=True)
    pruning.farthest_point_fill = fills["chain"]
    if args.out:
        args.out.write_text(json.dumps({"shape": vars(shape) if hasattr(shape, "__dict__") else str(shape),
                                        "schedule": str(sched), "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
