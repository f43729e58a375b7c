"""A tritonclient caller for tests/test_triton.py, run with the Triton environment's python (tritonclient needs
protobuf < 7, which the test venv does not hold):

    python tests/triton_client.py infer  HTTP_PORT CASES.json   # all cases at once, one thread each -> texts
    python tests/triton_client.py stream GRPC_PORT CASES.json   # one by one over a gRPC stream -> pieces per case
    python tests/triton_client.py bad    HTTP_PORT              # malformed + good requests at once -> (status, message)
    python tests/triton_client.py config FILE...                # parse config.pbtxt files with Triton's schema

CASES.json: [{"image": path or null, "prompt": str, "max_tokens": int}]. Prints one JSON document."""

import json
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def tensors(module, case: dict) -> list:
    out = []
    for name, array, kind in (("prompt", np.array([[case["prompt"].encode()]], dtype=object), "BYTES"),
                              ("image", None if case.get("image") is None else
                               np.array([[Path(case["image"]).read_bytes() if isinstance(case["image"], str)
                                          else case["image"]]], dtype=object), "BYTES"),
                              ("max_tokens", None if case.get("max_tokens") is None else
                               np.array([[case["max_tokens"]]], dtype=np.int32), "INT32")):
        if array is not None:
            tensor = module.InferInput(name, list(array.shape), kind)
            tensor.set_data_from_numpy(array)
            out.append(tensor)
    return out


def infer(port: str, cases: list) -> list:
    import tritonclient.http as http

    def one(case):
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=600)
        result = client.infer("halfv", tensors(http, case))
        return [result.as_numpy("text")[0][0].decode(), result.as_numpy("finish_reason")[0][0].decode()]

    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(one, cases))


def stream(port: str, cases: list) -> list:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(f"127.0.0.1:{port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    out = []
    for i, case in enumerate(cases):
        client.async_stream_infer("halfv_stream", tensors(grpc, case), request_id=str(i),
                                  enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = results.get(timeout=300)
            if error is not None:
                pieces.append({"error": str(error)})
                break
            text = result.as_numpy("text")
            if text is not None:
                pieces.append(text[0][0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        out.append(pieces)
    client.stop_stream()
    return out


def bad(port: str) -> list:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    requests = [{"prompt": "What is this?", "image": b"not an image"},
                {"prompt": "word " * 9000, "max_tokens": 4},
                {"prompt": "Hi", "max_tokens": 0},
                {"prompt": "Hi", "max_tokens": 100000},
                {"prompt": None, "max_tokens": 4},
                {"prompt": "Say hello.", "max_tokens": 4}]

    def one(request):
        inputs = [t for t in tensors(http, {**request, "prompt": request["prompt"] or ""})
                  if request["prompt"] is not None or t.name() != "prompt"]
        try:
            result = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=600).infer("halfv", inputs)
            return ["ok", result.as_numpy("text")[0][0].decode()]
        except InferenceServerException as e:
            return [e.status(), e.message()]

    with ThreadPoolExecutor(len(requests)) as pool:  # at once, so that Triton batches bad and good requests
        out = list(pool.map(one, requests))
    out.append(one(requests[-1]))  # and the server still answers afterwards
    return out


def config(files: list) -> list:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    parsed = []
    for path in files:
        message = text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
        parsed.append({"name": message.name, "backend": message.backend, "inputs": len(message.input),
                       "outputs": len(message.output), "max_batch_size": message.max_batch_size,
                       "decoupled": message.model_transaction_policy.decoupled,
                       "kind": model_config_pb2.ModelInstanceGroup.Kind.Name(message.instance_group[0].kind),
                       "profiles": list(message.instance_group[0].profile)})
    return parsed


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "config":
        print(json.dumps(config(args)))
    elif mode == "bad":
        print(json.dumps(bad(args[0])))
    else:
        cases = json.loads(Path(args[1]).read_text())
        print(json.dumps({"infer": infer, "stream": stream}[mode](args[0], cases)))
