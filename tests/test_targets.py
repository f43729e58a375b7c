"""A new engine target is one module plus one registration line: registered here (test-only), it is built by
`engine`, runs `run` and passes `validate` with no switch edited anywhere."""

import json

import pytest

from halfv_export.engines import EngineTarget, Runner, get_target, register_target
from halfv_export.engines.base import TARGETS
from halfv_export.engines.ort import OrtRunner
from tests.conftest import copy_build, make_image


class CountingRunner:
    """ONNX Runtime underneath; counts the graph calls so the test sees which runner ran."""

    runs_bf16 = False

    def __init__(self, artifacts):
        self.inner, self.calls = OrtRunner(artifacts), []

    def run(self, graph, feeds):
        self.calls.append(graph)
        return self.inner.run(graph, feeds)

    def describe(self):
        return "counting runner over " + self.inner.describe()


OPENED: list[CountingRunner] = []


def _build(artifacts, options, log):
    (artifacts / "counting").mkdir(exist_ok=True)
    (artifacts / "counting" / "engine.json").write_text(json.dumps({"ep": options.ep}))
    return {"target": "counting", "providers": ["counting"], "graphs": []}


def _open(artifacts, options):
    OPENED.append(CountingRunner(artifacts))
    return OPENED[-1]


@pytest.fixture
def counting_target():
    register_target(EngineTarget(name="counting", engine_dir="counting", build=_build, open=_open,
                                 summary="test-only"))
    yield
    TARGETS.pop("counting", None)


def test_a_registered_target_is_used_by_every_command(counting_target, exported, run_cli, tmp_path):
    artifacts = copy_build(exported, tmp_path / "artifacts")
    assert isinstance(CountingRunner(artifacts), Runner)  # the protocol is what the pipeline asks for
    built = run_cli("engine", "--artifacts", artifacts, "--target", "counting")
    assert built.exit_code == 0 and "built into" in built.output, built.output
    assert json.loads((artifacts / "counting" / "engine.json").read_text()) == {"ep": "cpu"}
    assert "counting/engine.json" in json.loads((artifacts / "manifest.json").read_text())["files"]
    make_image(448, 448, 3).save(tmp_path / "photo.png")
    answer = run_cli("run", "--artifacts", artifacts, "--target", "counting", "--image", tmp_path / "photo.png",
                     "--prompt", "What is this?", "--max-new-tokens", 3)
    assert answer.exit_code == 0, answer.output
    calls = OPENED[-1].calls
    assert calls[:3] == ["vision_448x448.onnx", "embed.onnx", "prefill_448x448.onnx"]  # the HalfV path
    assert set(calls[3:]) <= {"decode.onnx"} and len(calls) <= 5  # at most two decode steps for 3 tokens


def test_unknown_targets_are_refused_with_the_registered_names():
    from halfv_export.base.errors import BadInput

    with pytest.raises(BadInput, match="unknown target 'openvino'; choose one of: onnxruntime, tensorrt"):
        get_target("openvino")
