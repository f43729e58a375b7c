"""ONNX Runtime sessions. `build_ort_engines` is the engine stage for --target onnxruntime: it creates one session
per graph with full graph optimisation and saves the optimised model beside the graphs (ort/<graph>), so later
sessions start from it. Optimised models are tied to the execution provider and the machine that made them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..base.errors import BadInput
from ..base.atomic import write_text_atomic
from .arrays import NUMPY
from .base import EngineTarget, register_target

ORT_DIR = "ort"


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BadInput("onnxruntime is not installed; pip install 'halfv-export[onnx]'") from None
    return onnxruntime


def providers_for(ep: str) -> list[str]:
    ort = _ort()
    available = ort.get_available_providers()
    wanted = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
    if ep not in wanted:
        raise BadInput(f"unknown execution provider '{ep}'; choose cpu, cuda or tensorrt")
    if wanted[ep][0] not in available:
        raise BadInput(f"ONNX Runtime here has no {wanted[ep][0]} (available: {', '.join(available)}); install "
                       "onnxruntime-gpu instead of onnxruntime for --ep cuda/tensorrt")
    return wanted[ep]


def session_options(threads: int | None = None):
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def build_ort_engines(artifacts: Path, ep: str = "cpu") -> dict:
    """Optimise every graph for this machine's provider; writes ort/<graph> and ort/engine.json."""
    ort = _ort()
    artifacts = Path(artifacts)
    meta = json.loads((artifacts / "artifacts.json").read_text())
    providers = providers_for(ep)
    target = artifacts / ORT_DIR
    target.mkdir(exist_ok=True)
    for graph in meta["graphs"]:
        options = session_options()
        tmp = target / f".{graph}.tmp"
        options.optimized_model_filepath = str(tmp)
        if Path(f"{artifacts / graph}.data").exists():
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             f"{graph}.data")
        ort.InferenceSession(str(artifacts / graph), options, providers=providers)
        tmp.replace(target / graph)
    info = {"target": "onnxruntime", "ep": ep, "providers": providers, "onnxruntime": ort.__version__,
            "graph_optimization_level": "ORT_ENABLE_ALL", "graphs": meta["graphs"]}
    write_text_atomic(target / "engine.json", json.dumps(info, indent=2) + "\n")
    return info


class OrtRunner:
    """Runs named graphs of an artifacts folder; prefers the optimised copies in ort/ when the engine stage ran."""

    runs_bf16 = False  # the CPU provider has no bfloat16 kernels for these graphs
    arrays = NUMPY  # sessions take and return host numpy arrays

    def __init__(self, artifacts: Path, ep: str = "cpu", threads: int | None = None):
        self.artifacts = Path(artifacts)
        self.providers = providers_for(ep)
        self.threads = threads
        engine = self.artifacts / ORT_DIR / "engine.json"
        self.optimized = engine.exists() and json.loads(engine.read_text()).get("ep") == ep
        self._sessions: dict = {}

    def describe(self) -> str:
        import platform

        return (f"{platform.machine()} CPU, ONNX Runtime {_ort().__version__} {self.providers[0]}"
                + (" (optimised)" if self.optimized else ""))

    def session(self, graph: str):
        if graph not in self._sessions:
            path = self.artifacts / ORT_DIR / graph if self.optimized else self.artifacts / graph
            if not path.exists():
                raise BadInput(f"{path} is missing; re-run `halfv-export export`")
            self._sessions[graph] = _ort().InferenceSession(str(path), session_options(self.threads),
                                                            providers=self.providers)
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(graph)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


register_target(EngineTarget(
    name="onnxruntime", engine_dir=ORT_DIR,
    build=lambda artifacts, options, log: build_ort_engines(artifacts, options.ep),
    open=lambda artifacts, options: OrtRunner(artifacts, ep=options.ep, threads=options.threads),
    summary="ONNX Runtime sessions, optimised models saved in ort/ (cpu; cuda / tensorrt EPs with onnxruntime-gpu)"))
