"""The Triton orchestrator's request handling without a server: `triton_python_backend_utils` is a small fake whose
BLS calls run the repository's graphs with ONNX Runtime. Checks what a real server can hardly provoke on demand:
rows of one request, `full`, a bad request inside a batch, a graph model failing for one group, a stream whose
client goes away. Answers are compared with `halfv_export.load(build).generate` on each prompt alone."""

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import halfv_export
from halfv_export.engines.ort import OrtRunner, build_ort_engines
from halfv_export.serving.triton import TritonOptions, write_repository
from tests.conftest import copy_build, make_image

FINAL = 1


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class TritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code="UNKNOWN"):
        self._message, self.code = message, code

    def message(self):
        return self._message


class Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self._error = error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return [Tensor(n, a) for n, a in self.outputs.items()]

    def text(self):
        return self.outputs["text"][0][0].decode()


class Sender:
    def __init__(self, cancel_after=None):
        self.sent, self.cancel_after = [], cancel_after

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


class Request:
    def __init__(self, sender=None, **inputs):
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items() if value is not None}
        self.sender = sender

    def get_response_sender(self):
        return self.sender


def fake_backend(build: Path, calls: dict, broken: set):
    """The module the stub provides; BLS requests run on one OrtRunner over the repository's build."""
    runner = OrtRunner(build)

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, **_):
            self.model, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            if self.model in broken:
                return Response(error=TritonError(f"{self.model}: instance died"))
            out = runner.run(calls[self.model], {t.name(): t.as_numpy() for t in self.inputs})
            return Response([Tensor(n, out[n]) for n in self.outputs])

    return types.SimpleNamespace(
        Tensor=Tensor, InferenceResponse=Response, TritonError=TritonError, InferenceRequest=InferenceRequest,
        get_input_tensor_by_name=lambda request, name: request.inputs.get(name),
        using_decoupled_model_transaction_policy=lambda config: config["model_transaction_policy"]["decoupled"],
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL)


@pytest.fixture(scope="module")
def repo(exported, tmp_path_factory):
    build = copy_build(exported, tmp_path_factory.mktemp("orchestrator") / "build")
    build_ort_engines(build)
    out = build.parent / "repo"
    write_repository(build, out, TritonOptions(graph_backend="python"))
    return build, out


def orchestrator(repo, monkeypatch, decoupled: bool, broken=frozenset()):
    from halfv_export.serving.triton_models import Orchestrator

    build, out = repo
    graphs = json.loads((out / "halfv" / "graphs.json").read_text())
    calls = {spec["model"]: graph for graph, spec in graphs.items()}
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_backend(out / "halfv" / "build", calls,
                                                                                  set(broken)))
    model = Orchestrator()
    config = {"parameters": {"build": {"string_value": "../halfv/build"}},
              "model_transaction_policy": {"decoupled": decoupled}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(out / "halfv")})
    return model


def png(w, h, seed) -> bytes:
    buffer = io.BytesIO()
    make_image(w, h, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def column(*values, dtype=object):
    return np.array([[v] for v in values], dtype=dtype)


def test_a_batch_answers_each_request_and_refuses_only_the_bad_one(repo, monkeypatch):
    model = orchestrator(repo, monkeypatch, decoupled=False)
    square, wide = png(448, 448, 1), png(504, 336, 2)
    requests = [Request(prompt=column(b"What is this?"), image=column(square), max_tokens=column(6, dtype=np.int32)),
                Request(prompt=column(b"What is this?"), image=column(b"not an image")),
                Request(prompt=column(b"Say hello."), max_tokens=column(6, dtype=np.int32)),
                # two rows in one request, the second on the unpruned graphs
                Request(prompt=column(b"Describe it.", b"Describe it."), image=column(wide, wide),
                        max_tokens=column(5, 5, dtype=np.int32), full=column(False, True, dtype=bool)),
                Request(prompt=column(b"\xff\xfe"), max_tokens=column(3, dtype=np.int32))]
    responses = model.execute(requests)
    local = halfv_export.load(repo[0])
    assert responses[0].text() == local.generate(square, "What is this?", max_new_tokens=6).text
    assert responses[1].has_error() and responses[1].error().code == TritonError.INVALID_ARG
    assert "image cannot be read" in responses[1].error().message()
    assert responses[2].text() == local.generate(None, "Say hello.", max_new_tokens=6).text
    texts = [t[0].decode() for t in responses[3].outputs["text"]]
    assert texts == [local.generate(wide, "Describe it.", max_new_tokens=5).text,
                     local.generate(wide, "Describe it.", max_new_tokens=5, full=True).text]
    assert responses[4].error().message() == "the prompt is not UTF-8 text; send it UTF-8 encoded"


def test_a_failing_graph_model_fails_its_group_only(repo, monkeypatch):
    model = orchestrator(repo, monkeypatch, decoupled=False, broken={"halfv_vision_336x504"})
    requests = [Request(prompt=column(b"What is this?"), image=column(png(504, 336, 3))),
                Request(prompt=column(b"What is this?"), image=column(png(448, 448, 4)),
                        max_tokens=column(4, dtype=np.int32))]
    responses = model.execute(requests)
    assert responses[0].error().code == TritonError.INTERNAL
    assert "halfv_vision_336x504: instance died" in responses[0].error().message()
    assert "\n" not in responses[0].error().message()
    local = halfv_export.load(repo[0])
    assert responses[1].text() == local.generate(png(448, 448, 4), "What is this?", max_new_tokens=4).text


def test_streams_get_their_pieces_and_one_final_flag_and_stop_when_the_client_leaves(repo, monkeypatch):
    model = orchestrator(repo, monkeypatch, decoupled=True)
    image = png(448, 448, 5)
    staying, leaving, bad = Sender(), Sender(cancel_after=1), Sender()
    requests = [Request(staying, prompt=column(b"Describe it."), image=column(image),
                        max_tokens=column(12, dtype=np.int32)),
                Request(leaving, prompt=column(b"Describe it."), image=column(image),
                        max_tokens=column(12, dtype=np.int32)),
                Request(bad, prompt=column(b"Hi"), max_tokens=column(0, dtype=np.int32))]
    assert model.execute(requests) is None
    want = halfv_export.load(repo[0]).generate(image, "Describe it.", max_new_tokens=12)
    pieces = [r.text() for r, _ in staying.sent if r is not None]
    assert "".join(pieces) == want.text
    assert [flags for _, flags in staying.sent].count(FINAL) == 1 and staying.sent[-1][1] == FINAL
    assert staying.sent[-1][0] is not None  # the flag came with the last piece
    # the client that left after its first piece got the flag at once, and nothing after it
    assert [flags for _, flags in leaving.sent] == [0, FINAL] and leaving.sent[-1][0] is None
    assert len(bad.sent) == 1 and bad.sent[0][1] == FINAL and bad.sent[0][0].has_error()
