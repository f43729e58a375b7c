"""ONNX Runtime sessions over shared weights.

Every graph of an export reads its large initializers from one weights.bin (graphs/shared_weights.py). An OrtRunner
memory-maps that file once and hands each session the same buffers through SessionOptions.add_initializer (ORT:
"If a model contains an initializer with a name that is same as the name passed to this call, ORT will use this
initializer instance instead of deserializing one from the model file ... useful when you want to share the same
initializer across sessions"), so N sessions hold one copy of the weights, backed by the page cache.

`build_ort_engines` is the engine stage for --target onnxruntime. It does not save optimised model copies (each
would be a second full copy of the weights, tied to this machine): it opens every graph once with full graph
optimisation on the chosen provider, records how long that took, and writes ort/engine.json. Sessions optimise at
creation time, which the recorded seconds show is cheap next to a copy of the weights on disk. On the CPU provider
each session also gets the prefill graphs' causal attention fused into ORT's GroupQueryAttention kernel, rewritten
in memory from the small graph file (engines/ort_fusion.py; engine.json records how many sites per graph;
`engine --no-fuse-attention` keeps the graphs as exported, and run / validate / serve follow engine.json)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..base.errors import BadInput
from ..base.atomic import write_text_atomic
from .arrays import NUMPY
from .base import EngineTarget, register_target

ORT_DIR = "ort"
log = logging.getLogger("halfv_export")


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


def build_ort_engines(artifacts: Path, ep: str = "cpu", fuse_attention: bool = True) -> dict:
    """Open every graph once (full optimisation, shared weights) on this machine's provider; writes ort/engine.json."""
    ort = _ort()
    artifacts = Path(artifacts)
    meta = json.loads((artifacts / "artifacts.json").read_text())
    providers = providers_for(ep)
    target = artifacts / ORT_DIR
    target.mkdir(exist_ok=True)
    (target / "engine.json").unlink(missing_ok=True)  # the runner below must not follow a previous engine stage
    runner = OrtRunner(artifacts, ep=ep, fuse_attention=fuse_attention)
    seconds = {}
    for graph in meta["graphs"]:
        started = time.perf_counter()
        runner.session(graph)
        seconds[graph] = round(time.perf_counter() - started, 3)
        runner.close(graph)
    info = {"target": "onnxruntime", "ep": ep, "providers": providers, "onnxruntime": ort.__version__,
            "graph_optimization_level": "ORT_ENABLE_ALL", "optimised": "at session creation",
            "shared_weights": runner.shared_file is not None, "session_seconds": seconds,
            "fuse_attention": runner.fuse_attention, "fused_attention": runner.fused,
            "fusion_refused": runner.fusion_refused, "ran_on": runner.ran_on, "graphs": meta["graphs"]}
    write_text_atomic(target / "engine.json", json.dumps(info, indent=2) + "\n")
    return info


class SharedWeights:
    """weights.bin memory-mapped once; one OrtValue per tensor, handed to every session that names it."""

    def __init__(self, artifacts: Path, index: dict):
        import onnx

        ort = _ort()
        path = Path(artifacts) / index["file"]
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else None
        self.values: dict = {}
        for name, entry in index["tensors"].items():
            raw = self._map[entry["offset"]:entry["offset"] + entry["length"]]
            if entry["dtype"] == onnx.TensorProto.BFLOAT16:
                array = raw.view(np.uint16).reshape(entry["shape"])
                self.values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, entry["dtype"])
            else:
                array = raw.view(onnx.helper.tensor_dtype_to_np_dtype(entry["dtype"])).reshape(entry["shape"])
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)

    def add_to(self, options, names: set[str]) -> None:
        for name in names & self.values.keys():
            options.add_initializer(name, self.values[name])


def open_session(path: Path, options, providers: list[str], shared: "SharedWeights | None" = None,
                 fuse_attention: bool = True):
    """One InferenceSession of an exported graph -> (session, fused attention sites, why fusion was dropped or
    None). Shared weights go in through add_initializer; on the CPU provider the marked causal attention is fused
    first (engines/ort_fusion.py), and the rewritten graph, a few MB without its weights, is handed over as bytes."""
    import onnx

    from .ort_fusion import fuse_causal_attention

    model = onnx.load(str(path), load_external_data=False)
    if shared is not None:
        shared.add_to(options, {i.name for i in model.graph.initializer
                                if i.data_location == onnx.TensorProto.EXTERNAL})
    fused = fuse_causal_attention(model) if fuse_attention and providers[0] == "CPUExecutionProvider" else 0
    dropped = None
    if fused:
        # external data the shared weights do not cover is read relative to this folder, as for a model path
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            return _ort().InferenceSession(model.SerializeToString(), options, providers=providers), fused, None
        except Exception as e:  # e.g. an ONNX Runtime whose GroupQueryAttention lacks `causal` / attention_bias
            reason = " ".join(str(e).split()) or type(e).__name__
            dropped = reason if len(reason) <= 240 else "..." + reason[-240:]  # ORT names the cause last
            log.warning(f"warning: {path.name}: ONNX Runtime refused the fused attention ({dropped}); running the "
                        "graph as exported (slower prefill; `engine --no-fuse-attention` silences this)")
    return _ort().InferenceSession(str(path), options, providers=providers), 0, dropped


class OrtRunner:
    """Runs named graphs of an artifacts folder; all sessions share one memory-mapped copy of weights.bin."""

    runs_bf16 = False  # the CPU provider has no bfloat16 kernels for these graphs
    arrays = NUMPY  # sessions take and return host numpy arrays

    def __init__(self, artifacts: Path, ep: str = "cpu", threads: int | None = None, prepack: bool = False,
                 fuse_attention: bool = True):
        """prepack=True lets ORT pre-pack weights per session (its default; costs one copy of the packed weights
        per session); the default keeps one shared copy. fuse_attention: see engines/ort_fusion.py; an engine
        stage that ran with it off (engine.json) turns it off here too."""
        from ..graphs.shared_weights import read_index

        self.artifacts = Path(artifacts)
        self.prepack = prepack
        self.providers = providers_for(ep)
        self.threads = threads
        engine = self.artifacts / ORT_DIR / "engine.json"
        built = json.loads(engine.read_text()) if engine.exists() else {}
        self.optimized = built.get("ep") == ep
        self.fuse_attention = fuse_attention and built.get("fuse_attention", True)
        self.fused: dict[str, int] = {}
        self.fusion_refused: dict[str, str] = {}  # graph -> ONNX Runtime's reason, for engine.json
        self.ran_on: dict[str, list[str]] = {}  # graph -> the providers its session actually holds
        index = read_index(self.artifacts)
        meta_path = self.artifacts / "artifacts.json"
        quantize = json.loads(meta_path.read_text()).get("quantize") if meta_path.exists() else None
        self.quantized_graphs = set(quantize["graphs"]) if quantize else set()
        self._shared = SharedWeights(self.artifacts, index) if index and index["tensors"] else None
        self.shared_file = self._shared.path if self._shared else None
        self._sessions: dict = {}

    def describe(self) -> str:
        """The device and provider that run: those of the sessions opened so far (ONNX Runtime drops a provider
        it cannot initialise), else the provider asked for."""
        import platform

        ran = {p[0] for p in self.ran_on.values()} or {self.providers[0]}
        device = f"{platform.machine()} CPU" if ran == {"CPUExecutionProvider"} else "GPU"
        return (f"{device}, ONNX Runtime {_ort().__version__} {' + '.join(sorted(ran))}"
                + (" (engine stage ran)" if self.optimized else ""))

    def session(self, graph: str):
        if graph not in self._sessions:
            path = self.artifacts / graph
            if not path.exists():
                raise BadInput(f"{path} is missing; re-run `halfv-export export`")
            options = session_options(self.threads)
            # Quantised graphs keep prepacking: MatMulNBits without its packed B dequantises the whole weight on
            # every call (measured 1x896 @ 896x4864 int4: 0.13 ms packed, 25 ms unpacked); the packed copy per
            # session is about the size of the quantised weights (README "Quantised exports").
            if self._shared is not None and not self.prepack and graph not in self.quantized_graphs:
                # ORT's CPU MatMul re-packs each constant weight into a private buffer per session, which undoes
                # the sharing (measured: two sessions over a 4.9 GB weights.bin hold 2 copies with prepacking, 1
                # without; README "Real-size artifacts")
                options.add_session_config_entry("session.disable_prepacking", "1")
            session, self.fused[graph], refused = open_session(path, options, self.providers, self._shared,
                                                               self.fuse_attention)
            if refused:
                self.fusion_refused[graph] = refused
            self.ran_on[graph] = session.get_providers()
            self._sessions[graph] = session
        return self._sessions[graph]

    def close(self, graph: str) -> None:
        self._sessions.pop(graph, None)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(graph)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


register_target(EngineTarget(
    name="onnxruntime", engine_dir=ORT_DIR,
    build=lambda artifacts, options, log: build_ort_engines(artifacts, options.ep, options.fuse_attention),
    open=lambda artifacts, options: OrtRunner(artifacts, ep=options.ep, threads=options.threads,
                                              fuse_attention=options.fuse_attention),
    summary="ONNX Runtime sessions over one shared weights.bin, optimised at session creation (cpu; cuda / tensorrt EPs with onnxruntime-gpu)"))
