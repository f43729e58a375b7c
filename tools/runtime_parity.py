"""Answers of the runtime install against the full install, on one build (issue 40's measurement).

    python tools/runtime_parity.py --build build/ --runtime-venv /tmp/venv-rt --count 50 --out parity.json

Run with the full install's python (it needs torch and transformers). The cases: `count` questions of the build's
own task at its buckets, one non-square and one odd-sized image (fitted to a bucket as `run` does) and a text-only
prompt. "Full install" is the path `run` took before the runtime split: the adapters' host inputs (graphs/:
transformers' tokenizer and chat template; pixels and positions from host/, held equal to transformers' pieces by
tests/test_host.py), the same ONNX Runtime graphs. "Runtime" is the venv's base install (no torch, no transformers),
through `halfv_export.load().generate` (one batched call), `halfv-export run` (one process per case) and
`halfv-export serve` (one request per case). It also times `run`'s cold start to first answer and its peak RSS in
both installs, and with --before in the release before the split (`/usr/bin/time -v`, median of --repeats)."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from halfv_export.engines.api import Model
from halfv_export.engines.ort import OrtRunner
from halfv_export.engines.pipeline import EnginePipeline
from halfv_export.host.inputs import PAD_MULTIPLE, HostArrays, align_left
from halfv_export.stages.data import default_samples
from halfv_export.stages.export import load_for_source

ROOT = Path(__file__).resolve().parents[1]


class FullInstall(EnginePipeline):
    """EnginePipeline with the host side built by transformers' processors (the adapter), as before host/."""

    def fit_image(self, image):
        if image is None:
            return None
        natural, _ = self.adapter.bucket_for(self.processing, (image.height, image.width))
        if natural in self.buckets:
            return image
        aspect = image.width / image.height
        h, w = min(self.buckets, key=lambda b: (abs(np.log((b[1] / b[0]) / aspect)), -b[0] * b[1]))
        return image.resize((w, h))

    def host(self, images, prompts):
        host = self.adapter.host_inputs(self.processing, [self.fit_image(im) for im in images], prompts)
        pad = self.processing.tokenizer.pad_token_id
        host = HostArrays(input_ids=host.input_ids.numpy(), attention_mask=host.attention_mask.numpy(),
                          positions=host.positions.numpy(), visual_start=host.visual_start.numpy(),
                          num_visual=host.num_visual, next_positions=host.next_positions.numpy(),
                          pixel_values=[p.numpy() for p in host.pixel_values], bucket=host.bucket)
        return align_left(host, PAD_MULTIPLE, 0 if pad is None else int(pad))

    def decode_text(self, token_ids):
        return self.processing.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)


def make_cases(build: Path, count: int, folder: Path, budget: int) -> list[dict]:
    meta = json.loads((build / "artifacts.json").read_text())
    pipeline = FullInstall(build, OrtRunner(build))
    loaded = load_for_source(pipeline.adapter, meta["source"], None)
    buckets = [tuple(b["size"]) for b in meta["buckets"]]
    samples = default_samples(loaded, count, 2027, "eval", sizes=buckets, any_size=True)
    images = [(s.image, s.prompt, "task") for s in samples]
    images.append((samples[0].image.resize((517, 300)), samples[0].prompt, "non-square 300x517"))
    images.append((samples[1].image.resize((131, 97)), samples[1].prompt, "odd 97x131"))
    images.append((None, "Say hello in three words.", "text only"))
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (image, prompt, kind) in enumerate(images):
        path = None
        if image is not None:
            path = folder / f"case{i:03d}.png"
            image.save(path)
        cases.append({"image": None if path is None else str(path), "prompt": prompt, "kind": kind,
                      "max_new_tokens": budget})
    return cases


def full_install_answers(build: Path, cases: list[dict], budget: int) -> list:
    model = Model(FullInstall(build, OrtRunner(build)))
    return model.generate([c["image"] for c in cases], [c["prompt"] for c in cases], max_new_tokens=budget)


def runtime_generate(python: Path, build: Path, cases_file: Path) -> dict:
    out = subprocess.run([str(python), str(ROOT / "tests" / "runtime_answers.py"), str(build), str(cases_file)],
                         capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_args(build: Path, case: dict) -> list[str]:
    args = ["run", "--artifacts", str(build), "--prompt", case["prompt"], "--max-new-tokens",
            str(case["max_new_tokens"])]
    return args + (["--image", case["image"]] if case["image"] else [])


def runtime_run(venv: Path, build: Path, cases: list[dict]) -> list[str]:
    texts = []
    for case in cases:
        out = subprocess.run([str(venv / "bin" / "halfv-export"), *run_args(build, case)], capture_output=True,
                             text=True, check=True, timeout=600)
        texts.append(out.stdout[:-1])
    return texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runtime_serve(venv: Path, build: Path, cases: list[dict], images: Path) -> list[str]:
    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "halfv-export"), "serve", "--artifacts", str(build), "--port",
                               str(port), "--allow-images-from", str(images)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"serve exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        texts = []
        for case in cases:
            content = [{"type": "text", "text": case["prompt"]}]
            if case["image"]:
                content.append({"type": "image_url", "image_url": {"url": case["image"]}})
            body = {"max_tokens": case["max_new_tokens"], "messages": [{"role": "user", "content": content}]}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                texts.append(json.loads(response.read())["choices"][0]["message"]["content"])
        return texts
    finally:
        server.terminate()
        server.wait(timeout=60)


def cold_starts(commands: dict, build: Path, case: dict, repeats: int) -> dict:
    """`run` from process start to printed answer, per install: wall seconds and peak RSS (MiB), medians of
    `repeats`, the installs interleaved so that load on the box falls on each alike. commands: name -> (argv
    prefix, extra environment)."""
    walls: dict = {name: [] for name in commands}
    rss: dict = {name: [] for name in commands}
    for _ in range(repeats):
        for name, (prefix, env) in commands.items():
            out = subprocess.run(["/usr/bin/time", "-v", *prefix, *run_args(build, case)], capture_output=True,
                                 text=True, check=True, timeout=600, env={**os.environ, **env}, cwd="/tmp")
            wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
            walls[name].append(int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3)))
            rss[name].append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024)
    return {name: {"wall_s": round(statistics.median(walls[name]), 2),
                   "peak_rss_mib": round(statistics.median(rss[name]), 1), "runs": repeats} for name in commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--runtime-venv", type=Path, required=True, help="a venv holding the runtime install + [serve]")
    parser.add_argument("--full-venv", type=Path, default=Path(sys.prefix), help="for the cold-start comparison")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout of the release before the runtime split: its `run` "
                        "(transformers' processors) is timed too, with --full-venv's python")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = args.out.with_suffix(".cases")
    cases = make_cases(args.build, args.count, work, args.max_new_tokens)
    (work / "cases.json").write_text(json.dumps(cases))
    full = full_install_answers(args.build, cases, args.max_new_tokens)
    generated = runtime_generate(args.runtime_venv / "bin" / "python", args.build, work / "cases.json")
    ran = runtime_run(args.runtime_venv, args.build, cases)
    served = runtime_serve(args.runtime_venv, args.build, cases, work)
    rows = []
    for case, f, g, r, s in zip(cases, full, generated["answers"], ran, served, strict=True):
        rows.append({"kind": case["kind"], "full_text": f.text, "generate_tokens_equal": f.token_ids == g["token_ids"],
                     "run_text_equal": r == f.text, "serve_text_equal": s == f.text})
    kinds = sorted({r["kind"] for r in rows})
    commands = {"runtime": ([str(args.runtime_venv / "bin" / "halfv-export")], {}),
                "full": ([str(args.full_venv / "bin" / "halfv-export")], {})}
    if args.before:
        commands["full, before the split"] = ([str(args.full_venv / "bin" / "python"), "-m", "halfv_export.cli.main"],
                                              {"PYTHONPATH": str(args.before)})
    summary = {key: sum(r[key] for r in rows) for key in ("generate_tokens_equal", "run_text_equal",
                                                          "serve_text_equal")}
    result = {"build": str(args.build), "backbone": json.loads((args.build / "artifacts.json").read_text())["backbone"],
              "cases": len(rows), "kinds": {k: sum(r["kind"] == k for r in rows) for k in kinds}, **summary,
              "export_extra_loaded_by_generate": generated["export_extra_loaded"],
              "cold_start_run": cold_starts(commands, args.build, cases[0], args.repeats),
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
