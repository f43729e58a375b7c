"""The same requests against a running tritonserver (the repository of `halfv-export triton`) and a running
`halfv-export serve`, both over one build, and `halfv-export run` on each image alone:

    python tools/triton_bench.py --build build/ --triton 127.0.0.1:8000 --serve http://127.0.0.1:8080 \
        --images cases/ --concurrency 16 --max-tokens 12

Every request is sent at once from `concurrency` threads (one image each, the image files of --images in name
order with their prompts from --images/cases.json as tools/runtime_parity.py writes it). Prints: whether each
answer equals `run`'s, requests per second over the whole burst, p50 / p95 request latency. Needs tritonclient[http].
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def run_alone(build: Path, case: dict, max_tokens: int) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "halfv-export"), "run", "--artifacts", str(build),
                          "--image", case["image"], "--prompt", case["prompt"], "--max-new-tokens", str(max_tokens)],
                         capture_output=True, text=True, check=True, timeout=600)
    return out.stdout[:-1]


def triton_request(url: str, case: dict, max_tokens: int) -> tuple[str, float]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, network_timeout=600)
    inputs = []
    for name, array, kind in (("prompt", np.array([[case["prompt"].encode()]], dtype=object), "BYTES"),
                              ("image", np.array([[Path(case["image"]).read_bytes()]], dtype=object), "BYTES"),
                              ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32")):
        tensor = httpclient.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    started = time.perf_counter()
    result = client.infer("halfv", inputs)
    return result.as_numpy("text")[0][0].decode(), time.perf_counter() - started


def serve_request(url: str, case: dict, max_tokens: int) -> tuple[str, float]:
    image = base64.b64encode(Path(case["image"]).read_bytes()).decode()
    body = {"max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "text", "text": case["prompt"]},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        text = json.loads(response.read())["choices"][0]["message"]["content"]
    return text, time.perf_counter() - started


def burst(send, target: str, cases: list, max_tokens: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: send(target, case, max_tokens), cases))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for _, seconds in results)
    return {"texts": [text for text, _ in results], "requests_per_s": round(len(cases) / wall, 2),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))], 3),
            "wall_s": round(wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--triton", required=True, help="host:port of tritonserver's HTTP endpoint")
    parser.add_argument("--serve", required=True, help="base URL of `halfv-export serve`")
    parser.add_argument("--images", type=Path, required=True, help="a folder with cases.json (runtime_parity.py)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="bursts per server; the first is a warm-up")
    args = parser.parse_args()
    cases = [c for c in json.loads((args.images / "cases.json").read_text()) if c["image"]][:args.concurrency]
    alone = [run_alone(args.build, case, args.max_tokens) for case in cases]
    report = {"requests": len(cases), "max_tokens": args.max_tokens}
    for name, send, target in (("triton", triton_request, args.triton), ("serve", serve_request, args.serve)):
        bursts = [burst(send, target, cases, args.max_tokens) for _ in range(args.rounds)]
        timed = bursts[1:] or bursts
        report[name] = {"same_as_run_alone": sum(t == a for b in bursts for t, a in zip(b["texts"], alone)),
                        "of": len(cases) * len(bursts),
                        **{key: round(statistics.median(b[key] for b in timed), 3)
                           for key in ("requests_per_s", "p50_s", "p95_s", "wall_s")}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
