"""A bounded load test for `halfv-export serve`, on loopback only: N requests from C clients, every answer checked
against the answer the same request gets alone.

    python -m tests.serve_load --url http://127.0.0.1:8000 --requests 40 --clients 8 --max-tokens 12

Each client is one httpx.AsyncClient (its own connection pool) that sends its share of the requests at once, so all
N requests are in flight together; half of them stream. The cases mix both exported buckets of the embedded build
(448x448 and 336x504 images, sent as data: URLs) and text-only prompts, so the server has to group by bucket.
Reference answers come first, one request at a time. Prints one JSON summary: requests, clients, failures (an error,
a lost or an incomplete answer), wrong (an answer that differs from its reference), p50/p95/max latency, wall time,
and the batch sizes the server formed (its /metrics before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import time
from collections import Counter
from urllib.parse import urlparse

import numpy as np

PROMPTS = ["What is in this picture?", "Describe the colours.", "Count the shapes, please.", "What is written here?",
           "Tell me a short story about a red circle.", "Which words are visible in the image?"]


def image_url(width: int, height: int, seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def cases(max_tokens: int) -> list[dict]:
    """Six distinct requests: two per 448x448 / 336x504 bucket, two text-only, max_tokens varied around the given."""
    sizes = [(448, 448), (504, 336), None, (448, 448), (504, 336), None]
    out = []
    for i, (size, prompt) in enumerate(zip(sizes, PROMPTS)):
        content = [{"type": "text", "text": prompt}]
        if size is not None:
            content.append({"type": "image_url", "image_url": {"url": image_url(*size, seed=100 + i)}})
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens - (i % 3)})
    return out


async def ask(client, body: dict, stream: bool) -> dict:
    """One request -> {"status", "content", "finish", "tokens", "batch", "error"}; a stream is read to [DONE]."""
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        data = r.json()
        if r.status_code != 200:
            return {"status": r.status_code, "error": data.get("error", {}).get("message")}
        choice = data["choices"][0]
        return {"status": 200, "content": choice["message"]["content"], "finish": choice["finish_reason"],
                "tokens": data["usage"]["completion_tokens"], "batch": data["halfv"]["batch_size"]}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    out = {"status": None, "content": "", "finish": None, "tokens": None, "batch": None, "done": False}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = json.loads(await r.aread()).get("error", {}).get("message")
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]["message"]
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                out["content"] += choice["delta"].get("content", "") or ""
                if choice["finish_reason"]:
                    out["finish"] = choice["finish_reason"]
                    out["batch"] = chunk["halfv"]["batch_size"]
    if not out["done"]:
        out["error"] = "stream ended without data: [DONE]"
    return out


async def run_load(url: str, requests: int = 40, clients: int = 8, max_tokens: int = 12,
                   timeout: float = 300.0) -> dict:
    import httpx

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"the load test runs on loopback only, not {host}")
    bodies = cases(max_tokens)
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as one:
        reference = [await ask(one, body, stream=False) for body in bodies]
        before = (await one.get("/metrics")).json()
    bad_reference = [r for r in reference if r["status"] != 200]
    if bad_reference:
        raise RuntimeError(f"reference request failed: {bad_reference[0]}")

    latencies, results = [0.0] * requests, [None] * requests

    async def one_request(client, i: int) -> None:
        start = time.perf_counter()
        try:
            results[i] = await ask(client, bodies[i % len(bodies)], stream=i % 2 == 1)
        except Exception as e:  # noqa: BLE001 - a transport failure is a failed request, counted below
            results[i] = {"status": None, "error": f"{e.__class__.__name__}: {e}"}
        latencies[i] = time.perf_counter() - start

    async def one_client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(one_request(client, i) for i in range(c, requests, clients)))

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one_client(c) for c in range(clients))), timeout)
    wall = time.perf_counter() - started
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as one:
        after = (await one.get("/metrics")).json()

    failures, wrong = [], []
    for i, got in enumerate(results):
        want = reference[i % len(bodies)]
        if got is None or got.get("status") != 200 or got.get("error") or got.get("finish") is None:
            failures.append({"request": i, **(got or {"error": "lost"})})
        elif (got["content"], got["finish"], got["tokens"]) != (want["content"], want["finish"], want["tokens"]):
            wrong.append({"request": i, "got": got, "want": want})
    sizes = Counter(after["batches"]["sizes"]) - Counter(before["batches"]["sizes"])
    ms = np.array(latencies) * 1000
    return {
        "requests": requests, "clients": clients, "in_flight": requests, "max_tokens": max_tokens,
        "failures": len(failures), "wrong": len(wrong), "details": (failures + wrong)[:5],
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "max_ms": round(float(ms.max()), 1), "wall_s": round(wall, 2),
        "batch_sizes": {k: sizes[k] for k in sorted(sizes, key=int)},
        "request_batch_sizes": dict(sorted(Counter(r["batch"] for r in results if r and r.get("batch")).items())),
        "server_max_batch": after["max_batch"], "batch_wait_ms": after["batch_wait_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run_load(args.url, args.requests, args.clients, args.max_tokens, args.timeout)),
                     indent=2))


if __name__ == "__main__":
    main()
