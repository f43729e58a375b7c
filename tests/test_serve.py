"""`halfv-export serve` as a client sees it: a real uvicorn server on 127.0.0.1 (a free port), real httpx requests,
answers compared with `run` and the Python API; bad requests get OpenAI-shaped one-line 4xx errors; a client that
disconnects mid-stream frees its slot; a bounded load test loses nothing and answers every request correctly."""

import asyncio
import base64
import io
import json
import time

import httpx
import pytest

import halfv_export
from halfv_export.serving.server import Server, build_server
from tests.conftest import make_image
from tests.serve_load import run_load


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, url: str | None = None, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"model": "qwen2.5-vl-halfv", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    make_image(448, 448, 31).save(root / "square.png")
    make_image(300, 200, 32).save(root / "small.png")
    return root


@pytest.fixture(scope="module")
def server(exported, allowed):
    app, batcher, _ = build_server(exported, max_batch=8, batch_wait_ms=20, allow_images_from=(allowed,),
                                   max_body_mib=1)
    running = Server(app, batcher, "127.0.0.1", 0, log_level="warning").start()
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def metrics(client) -> dict:
    return client.get("/metrics").json()


def test_models_and_health(client, exported):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["qwen2.5-vl-halfv"]
    assert models["data"][0]["halfv"]["buckets"] == ["448x448", "336x504"]
    assert client.get("/v1/models/qwen2.5-vl-halfv").json()["id"] == "qwen2.5-vl-halfv"
    assert client.get("/health").json() == {"status": "ok"}


def test_chat_completion_with_an_image_matches_run(client, exported, allowed, run_cli):
    r = client.post("/v1/chat/completions", json=chat("What is in this picture?",
                                                      data_url(make_image(448, 448, 31)), max_tokens=12))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    ran = run_cli("run", "--artifacts", exported, "--image", allowed / "square.png", "--prompt",
                  "What is in this picture?", "--max-new-tokens", 12)
    assert ran.exit_code == 0 and choice["message"]["content"] + "\n" == ran.output
    expected = halfv_export.load(exported).generate(allowed / "square.png", "What is in this picture?", 12)
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.token_ids),
                             "total_tokens": expected.prompt_tokens + len(expected.token_ids)}
    assert body["halfv"]["bucket"] == "448x448" and body["halfv"]["pruned"] is True
    assert r.headers["x-halfv-batch-size"] == str(body["halfv"]["batch_size"])
    # the same image named by an allowed path, and as a file:// URL
    for url in (str(allowed / "square.png"), (allowed / "square.png").as_uri()):
        again = client.post("/v1/chat/completions", json=chat("What is in this picture?", url, max_tokens=12))
        assert again.status_code == 200 and again.json()["choices"][0]["message"] == choice["message"]


def test_streaming_sends_openai_chunks_that_join_to_the_answer(client):
    body = chat("Describe the colours.", data_url(make_image(504, 336, 33)), max_tokens=10)
    whole = client.post("/v1/chat/completions", json=body).json()
    chunks, done = [], False
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            assert not done, "nothing may follow [DONE]"
            chunks.append(json.loads(line[6:]))
    assert done
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert text == whole["choices"][0]["message"]["content"]
    assert finish == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_text_only_and_string_content(client, exported):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_completion_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    expected = halfv_export.load(exported).generate(None, "hi", 5)
    assert r.json()["choices"][0]["message"]["content"] == expected.text
    assert r.json()["halfv"]["bucket"] is None and r.json()["halfv"]["pruned"] is False


def _garbage_png() -> str:
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()


BAD = [  # (id, request body or raw bytes, status, words in the one-line message)
    ("malformed-base64", chat("hi", "data:image/png;base64,@@@notbase64"), 400, "base64 payload is malformed"),
    ("not-an-image", chat("hi", _garbage_png()), 400, "cannot be read"),
    ("not-a-data-url", chat("hi", "data:image/png,raw"), 400, "data:image/png;base64,<payload>"),
    ("missing-file", chat("hi", "{allowed}/nope.png"), 400, "does not exist"),
    ("outside-allowed", chat("hi", "/etc/hostname"), 400, "outside the folders this server may read"),
    ("relative-path", chat("hi", "square.png"), 400, "is not absolute"),
    ("remote-url", chat("hi", "https://example.com/cat.png"), 400, "https URLs are refused"),
    ("http-url", chat("hi", "http://127.0.0.1:1/cat.png"), 400, "does not fetch from the network"),
    ("two-images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "{allowed}/square.png"}},
        {"type": "image_url", "image_url": {"url": "{allowed}/small.png"}}]}]}, 400, "one image per request"),
    ("not-json", b"{not json", 400, "not valid JSON"),
    ("no-messages", {"model": "qwen2.5-vl-halfv"}, 400, "messages: must be a non-empty list"),
    ("two-turns", {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}, 400,
     "exactly one user message"),
    ("bad-part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "parts are"),
    ("zero-max-tokens", chat("hi", max_tokens=0), 400, "max_tokens: must be an integer from 1 to 4096"),
    ("sampling", chat("hi", temperature=0.7), 400, "decoding is greedy"),
    ("n", chat("hi", n=2), 400, "one choice per request"),
    ("context", chat("hi " * 5000, max_tokens=4096), 400, "over the 8192-token limit"),
    ("unknown-model", {**chat("hi"), "model": "gpt-4o"}, 404, "the model 'gpt-4o' does not exist"),
    ("oversized-body", chat("x" * (1024 * 1024 + 10)), 413, "over the 1048576-byte limit"),
]


@pytest.mark.parametrize("case, body, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_one_line_4xx(client, allowed, case, body, status, words):
    if isinstance(body, dict):
        body = json.dumps(body).replace("{allowed}", str(allowed)).encode()
    before = metrics(client)["requests"]
    r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert metrics(client)["requests"]["invalid"] == before["invalid"] + 1


def test_oversized_body_without_content_length_is_refused(client):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over the 1048576-byte limit" in r.json()["error"]["message"]


def test_unknown_routes_and_methods(client):
    r = client.get("/v1/completions")
    assert r.status_code == 404 and "no route GET /v1/completions" in r.json()["error"]["message"]
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, server):
    before = metrics(client)
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/chat/completions",
                          json=chat("Tell me everything.", data_url(make_image(448, 448, 34)), max_tokens=4000,
                                    stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # the role chunk and a few tokens
            assert all(line.startswith("data: ") or not line for line in got)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = metrics(client)
        if now["requests"]["cancelled"] > before["requests"]["cancelled"] and now["queue"]["running"] == 0:
            break
        time.sleep(0.1)
    assert now["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert now["queue"] == {"waiting": 0, "running": 0}
    assert now["requests"]["completed"] == before["requests"]["completed"], "it was dropped, not run to the end"
    r = client.post("/v1/chat/completions", json=chat("hi", max_tokens=3))  # the server carries on
    assert r.status_code == 200


@pytest.mark.slow
def test_bounded_load_every_request_answered_correctly(server, client, capsys):
    """40 requests in flight from 8 clients (half streaming, both buckets and text-only): none lost, none wrong."""
    report = asyncio.run(run_load(server.url, requests=40, clients=8, max_tokens=12, timeout=600))
    with capsys.disabled():
        print("\nload test:", json.dumps({k: v for k, v in report.items() if k != "details"}))
    assert report["failures"] == 0 and report["wrong"] == 0, report["details"]
    assert sum(int(k) * v for k, v in report["batch_sizes"].items()) == 40
    assert max(int(k) for k in report["batch_sizes"]) > 1, "waiting requests of one bucket were batched"
    assert client.get("/health").json() == {"status": "ok"}


def test_names_and_paths_with_control_characters_stay_one_line(client, allowed):
    r = client.get("/v1/no%1Broute")  # (httpx itself drops %0A from a URL, as the WHATWG URL rules say)
    assert r.status_code == 404 and "no route GET /v1/no\\x1broute;" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**chat("hi"), "model": "evil\nmodel"})
    assert r.status_code == 404 and "evil\\nmodel" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=chat("hi", f"{allowed}/no\npe.png"))
    assert r.status_code == 400 and "\n" not in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", content=b"[" * 100_000).status_code == 400  # nesting bomb
