"""Engine time to first token of several builds side by side: full (unpruned, uncut tower) against HalfV, per build,
timed in one process in turns, on the same questions, so ratios between builds share the machine's state.

    PYTHONPATH=. python tools/ttft_pair.py --build /tmp/llm --build /tmp/cut --data questions/ --samples 8 --runs 5

For each build and sample: one warm-up, then `runs` timed calls of `prefill(host(image, prompt))` (host inputs,
embedding, vision tower, prefill: what validate's latency_ms.engine_{full,halfv}_ttft times), the builds and both
sides taking turns within each run. Prints the medians over all calls, the ratio full / HalfV per build, and each
build's ratio against the first build's.
"""
import argparse
import statistics
import time
from pathlib import Path

from halfv_export.base.data import load_data
from halfv_export.engines.api import open_pipeline
from halfv_export.engines.base import EngineOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, action="append", required=True, help="A build folder (repeat).")
    parser.add_argument("--data", type=Path, required=True, help="make-task folder or prompts.jsonl.")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads.")
    args = parser.parse_args()
    pipelines = {b: open_pipeline(b, "onnxruntime", EngineOptions(threads=args.threads)) for b in args.build}
    samples = [s for s in load_data(args.data) if s.image is not None][:args.samples]
    times = {(b, side): [] for b in args.build for side in ("full", "halfv")}
    for sample in samples:
        calls = {(b, side): (lambda p=p, halfv=(side == "halfv"): p.prefill(p.host([sample.image], [sample.prompt]),
                                                                         halfv=halfv))
                 for b, p in pipelines.items() for side in ("full", "halfv")}
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.runs):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                times[key].append((time.perf_counter() - start) * 1000)
    first = None
    print(f"{len(samples)} samples x {args.runs} runs, ONNX Runtime threads {args.threads}")
    print(f"{'build':40} {'full ms':>9} {'HalfV ms':>9} {'full/HalfV':>11} {'vs first':>9}")
    for b, p in pipelines.items():
        full, halfv = (statistics.median(times[(b, side)]) for side in ("full", "halfv"))
        ratio = full / halfv
        first = first or ratio
        cut = p.meta.get("vision_cut")
        label = f"{b.name} ({'cut ' + str(cut['block']) + ':' + str(cut['keep']) if cut else 'LLM-only'})"
        print(f"{label:40} {full:9.2f} {halfv:9.2f} {ratio:10.2f}x {ratio / first:8.2f}x")


if __name__ == "__main__":
    main()
