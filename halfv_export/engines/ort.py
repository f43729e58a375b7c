"""ONNX Runtime sessions over shared weights.

Every graph of an export reads its large initializers from one weights.bin (graphs/shared_weights.py). An OrtRunner
memory-maps that file once and hands each session the same buffers through SessionOptions.add_initializer (ORT:
"If a model contains an initializer with a name that is same as the name passed to this call, ORT will use this
initializer instance instead of deserializing one from the model file ... useful when you want to share the same
initializer across sessions"), so N sessions hold one copy of the weights, backed by the page cache. The one
exception is a vision graph on the CPU provider in a one-bucket build (`tower_options`): its session reads and
prepacks its own weights, which no other graph uses.

`build_ort_engines` is the engine stage for --target onnxruntime. It does not save optimised model copies (each
would be a second full copy of the weights, tied to this machine): it opens every graph once with full graph
optimisation on the chosen provider, records how long that took, and writes ort/engine.json. Sessions optimise at
creation time, which the recorded seconds show is cheap next to a copy of the weights on disk. On the CPU provider
the prefill graphs' causal attention is fused into ORT's GroupQueryAttention kernel (engines/ort_fusion.py, which
needs the `onnx` package): the engine stage writes each rewritten graph, a few MB without its weights, to ort/ and
records it in engine.json, so a runner opens it as it is and the runtime install (no onnx, no torch) runs the same
graphs as the toolchain. `engine --no-fuse-attention` keeps the graphs as exported; run / validate / serve follow
engine.json. Artifacts that never had the engine stage are fused in memory where onnx is installed, else run as
exported (one warning)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..base.artifact_files import NUMPY_BY_ONNX, ONNX_BFLOAT16, ORT_DIR, bucket_of, is_tower, read_index
from ..base.atomic import write_bytes_atomic, write_text_atomic
from ..base.errors import BadInput
from .arrays import NUMPY
from .base import EngineTarget, register_target

log = logging.getLogger("halfv_export")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BadInput("onnxruntime is not installed; reinstall halfv-export (its base install brings ONNX "
                       "Runtime)") from None
    return onnxruntime


def providers_for(ep: str) -> list[str]:
    ort = _ort()
    available = ort.get_available_providers()
    wanted = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
    if ep not in wanted:
        raise BadInput(f"unknown execution provider '{ep}'; choose cpu, cuda or tensorrt")
    if wanted[ep][0] not in available:
        raise BadInput(f"ONNX Runtime here has no {wanted[ep][0]} (available: {', '.join(available)}); for --ep "
                       "cuda/tensorrt put onnxruntime-gpu in place of onnxruntime, which installs the same module: "
                       "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`")
    return wanted[ep]


def session_options(threads: int | None = None):
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def tower_options(options, graph: str, providers: list[str]) -> bool:
    """Set the CPU session options of a vision graph (True where `graph` is one on the CPU provider): one pass over
    thousands of patches, dozens of large activations per block. No planner buffer reuse: ONNX Runtime's allocation planner hands a dead tensor's buffer to a later value
    of the same size, which chains the first block's buffers through every later block, so the tower holds the sum
    of one block's activations rather than the largest set alive at once. Without it each tensor is freed when it
    dies and the arena hands its memory to the next allocation (and no memory pattern, which needs that reuse).

    Nodes run in the graph's own order (priority-based): the default order walks back from the outputs, and a tower
    with a vision cut (whose chunked scoring block feeds both the block's output and the token selection) then ran
    every query chunk's score matrix before any of their softmaxes, holding all of them at once."""
    if not (is_tower(graph) and providers[0] == "CPUExecutionProvider"):
        return False
    options.enable_mem_reuse = False
    options.enable_mem_pattern = False
    options.execution_order = _ort().ExecutionOrder.PRIORITY_BASED
    return True


def run_options_for(session):
    """What `run` passes to a graph's session.run: a CPU tower's arena gives its free chunks back when the run ends
    (its activations are not needed until the next image, and the prefill and decode sessions have arenas of their
    own). None for other graphs, and where the session has no CPU arena to shrink (ORT would refuse the run)."""
    options = session.get_session_options()  # tower_options turned the planner's reuse off
    if session.get_providers()[0] != "CPUExecutionProvider" or options.enable_mem_reuse \
            or not options.enable_cpu_mem_arena:
        return None
    run_options = _ort().RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return run_options


def build_ort_engines(artifacts: Path, ep: str = "cpu", fuse_attention: bool = True) -> dict:
    """Open every graph once (full optimisation, shared weights) on this machine's provider; writes ort/engine.json."""
    ort = _ort()
    artifacts = Path(artifacts)
    meta = json.loads((artifacts / "artifacts.json").read_text())
    providers = providers_for(ep)
    target = artifacts / ORT_DIR
    target.mkdir(exist_ok=True)
    (target / "engine.json").unlink(missing_ok=True)  # the runner below must not follow a previous engine stage
    for stale in target.glob("*.onnx"):  # fused graphs of a previous engine stage
        stale.unlink()
    runner = OrtRunner(artifacts, ep=ep, fuse_attention=fuse_attention, engine_stage=True)
    seconds = {}
    for graph in meta["graphs"]:
        started = time.perf_counter()
        runner.fuse_into(graph, target / graph)
        runner.session(graph)
        seconds[graph] = round(time.perf_counter() - started, 3)
        runner.close(graph)
        if graph in runner.fusion_refused:  # ORT cannot run the rewrite: the runner opens the graph as exported
            (target / graph).unlink(missing_ok=True)
            runner.fused_files.pop(graph, None)
    fused_files = runner.fused_files
    info = {"target": "onnxruntime", "ep": ep, "providers": providers, "onnxruntime": ort.__version__,
            "graph_optimization_level": "ORT_ENABLE_ALL", "optimised": "at session creation",
            "shared_weights": runner.shared_file is not None, "session_seconds": seconds,
            "fuse_attention": runner.fuse_attention, "fused_attention": runner.fused, "fused_graphs": fused_files,
            "fusion_refused": runner.fusion_refused, "ran_on": runner.ran_on, "graphs": meta["graphs"]}
    write_text_atomic(target / "engine.json", json.dumps(info, indent=2) + "\n")
    return info


class SharedWeights:
    """weights.bin memory-mapped once; one OrtValue per tensor, handed to every session. Tensor names are content
    keys (graphs/shared_weights.tensor_key), so a session is given all of them: ORT uses the ones its graph names
    and ignores the rest, and no graph has to be parsed to know which."""

    def __init__(self, artifacts: Path, index: dict):
        ort = _ort()
        path = Path(artifacts) / index["file"]
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else None
        self.values: dict = {}
        for name, entry in index["tensors"].items():
            if entry["dtype"] not in NUMPY_BY_ONNX:
                raise BadInput(f"{path}: tensor {name} has ONNX element type {entry['dtype']}, which this runner "
                               "does not read; re-export with this version of halfv-export")
            raw = self._map[entry["offset"]:entry["offset"] + entry["length"]]
            array = raw.view(NUMPY_BY_ONNX[entry["dtype"]]).reshape(entry["shape"])
            if entry["dtype"] == ONNX_BFLOAT16:
                self.values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, entry["dtype"])
            else:
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)

    def add_to(self, options) -> None:
        for name, value in self.values.items():
            options.add_initializer(name, value)


def fused_graph(path: Path, providers: list[str], fuse_attention: bool = True) -> tuple[bytes | None, int]:
    """The graph with its marked causal attention fused for the CPU provider (engines/ort_fusion.py), serialised
    without its weights, and the number of fused sites; (None, 0) where nothing is fused. Needs the onnx package
    (the toolchain)."""
    if not fuse_attention or providers[0] != "CPUExecutionProvider":
        return None, 0
    import onnx

    from .ort_fusion import fuse_causal_attention

    model = onnx.load(str(path), load_external_data=False)
    sites = fuse_causal_attention(model)
    return (model.SerializeToString(), sites) if sites else (None, 0)


def open_session(path: Path, options, providers: list[str], shared: "SharedWeights | None" = None,
                 fused: bytes | None = None):
    """One InferenceSession of an exported graph -> (session, why the fused graph was refused or None). Shared
    weights go in through add_initializer; `fused` (fused_graph's bytes, or an ort/ file the engine stage wrote)
    runs instead of the file at `path` where ONNX Runtime accepts it."""
    if shared is not None:
        shared.add_to(options)
    if fused is not None:
        # external data the shared weights do not cover is read relative to the graph's folder, as for a model path
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            return _ort().InferenceSession(fused, options, providers=providers), None
        except Exception as e:  # e.g. an ONNX Runtime whose GroupQueryAttention lacks `causal` / attention_bias
            reason = " ".join(str(e).split()) or type(e).__name__
            dropped = reason if len(reason) <= 240 else "..." + reason[-240:]  # ORT names the cause last
            log.warning(f"warning: {path.name}: ONNX Runtime refused the fused attention ({dropped}); running the "
                        "graph as exported (slower prefill; `engine --no-fuse-attention` silences this)")
            return _ort().InferenceSession(str(path), options, providers=providers), dropped
    return _ort().InferenceSession(str(path), options, providers=providers), None


def graph_session(path: Path, options=None, providers: list[str] | None = None):
    """One graph file as a runner opens it (fused where marked, a tower with tower_options, no shared weights) ->
    (session, fused sites): for benchmarks and profiles of single graphs."""
    providers = providers or ["CPUExecutionProvider"]
    options = options or session_options()
    tower_options(options, Path(path).name, providers)
    fused, sites = fused_graph(Path(path), providers)
    session, refused = open_session(Path(path), options, providers, None, fused)
    return session, 0 if refused else sites


class OrtRunner:
    """Runs named graphs of an artifacts folder; the sessions share one memory-mapped copy of weights.bin (a
    one-bucket build's CPU vision session excepted: see tower_options and `session`)."""

    runs_bf16 = False  # the CPU provider has no bfloat16 kernels for these graphs
    arrays = NUMPY  # sessions take and return host numpy arrays

    def __init__(self, artifacts: Path, ep: str = "cpu", threads: int | None = None, prepack: bool = False,
                 fuse_attention: bool = True, engine_stage: bool = False):
        """prepack=True lets ORT pre-pack weights per session (its default; costs one copy of the packed weights
        per session); the default keeps one shared copy. fuse_attention: see engines/ort_fusion.py; an engine
        stage that ran with it off (engine.json) turns it off here too. engine_stage: this runner is the engine
        stage's own, which decides each graph's fusion and names the ort/ files (fuse_into)."""
        self.artifacts = Path(artifacts)
        self.prepack = prepack
        self.providers = providers_for(ep)
        self.threads = threads
        engine = self.artifacts / ORT_DIR / "engine.json"
        built = json.loads(engine.read_text()) if engine.exists() else {}
        self.optimized = built.get("ep") == ep
        self.fuse_attention = fuse_attention and built.get("fuse_attention", True)
        # the engine stage's fused graphs (ort/) are for the provider it ran on: where that is this runner's CPU
        # provider it decided for every graph; otherwise (another provider, an engine stage before fused files,
        # none at all) this runner decides graph by graph
        follows = built.get("ep") == ep and self.providers[0] == "CPUExecutionProvider" and self.fuse_attention
        self.stage_fused = engine_stage or (follows and "fused_graphs" in built)
        self.fused_files: dict[str, str] = dict(built.get("fused_graphs", {})) if follows else {}
        self.recorded_sites: dict[str, int] = built.get("fused_attention", {}) if follows else {}
        self.fused: dict[str, int] = {}
        self.fusion_refused: dict[str, str] = {}  # graph -> ONNX Runtime's reason, for engine.json
        self.ran_on: dict[str, list[str]] = {}  # graph -> the providers its session actually holds
        index = read_index(self.artifacts)
        meta_path = self.artifacts / "artifacts.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        quantize = meta.get("quantize")
        self.quantized_graphs = set(quantize["graphs"]) if quantize else set()
        graphs = meta.get("graphs") or [p.name for p in self.artifacts.glob("*.onnx")]
        self.vision_graphs = {g for g in graphs if is_tower(g)}
        self._shared = SharedWeights(self.artifacts, index) if index and index["tensors"] else None
        self.shared_file = self._shared.path if self._shared else None
        self._sessions: dict = {}
        self._warned_unfused = False

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
            tower = tower_options(options, graph, self.providers)
            # A one-bucket build's tower reads and prepacks its own weights (no other graph uses them, ORT releases
            # what it read once packed, and packed GEMM operands are what make the tower faster than eager); with
            # several buckets each vision session would pack a copy, so they share the mapping unpacked instead. A
            # cut build's one bucket has two towers (cut, and uncut for --full): each packs its own, so both run
            # as fast as an uncut build's tower, at twice the tower's weights.
            own_weights = tower and {bucket_of(g) for g in self.vision_graphs} <= {bucket_of(graph)}
            # Quantised graphs keep prepacking: MatMulNBits without its packed B dequantises the whole weight on
            # every call (measured 1x896 @ 896x4864 int4: 0.13 ms packed, 25 ms unpacked); the packed copy per
            # session is about the size of the quantised weights (README "Quantised exports").
            if (not own_weights and self._shared is not None and not self.prepack
                    and graph not in self.quantized_graphs):
                # ORT's CPU MatMul re-packs each constant weight into a private buffer per session, which undoes
                # the sharing (measured: two sessions over a 4.9 GB weights.bin hold 2 copies with prepacking, 1
                # without; README "Real-size artifacts")
                options.add_session_config_entry("session.disable_prepacking", "1")
            fused, self.fused[graph] = self._fused(graph)
            session, refused = open_session(path, options, self.providers, None if own_weights else self._shared,
                                            fused)
            if refused:
                self.fused[graph] = 0
                self.fusion_refused[graph] = refused
            # the session reads the mapped weights in place: it keeps the mapping alive even where a caller drops
            # the runner and keeps the session (unmapped, its next run would read freed pages and crash)
            session.halfv_weights = None if own_weights else self._shared
            self.ran_on[graph] = session.get_providers()
            self._sessions[graph] = session
        return self._sessions[graph]

    def _fused(self, graph: str) -> tuple[bytes | None, int]:
        """The graph to run in place of the exported one, and its fused sites: the engine stage's ort/ file, or
        none where that stage fused nothing in it; without such a stage, fused in memory, or as exported where onnx
        is not installed."""
        if self.stage_fused and graph not in self.fused_files:
            return None, 0
        if graph in self.fused_files:
            path = self.artifacts / self.fused_files[graph]
            if not path.exists():
                raise BadInput(f"{path} is missing; re-run `halfv-export engine --artifacts {self.artifacts}`")
            return path.read_bytes(), int(self.recorded_sites.get(graph, 0))
        try:
            return fused_graph(self.artifacts / graph, self.providers, self.fuse_attention)
        except ImportError:
            if not self._warned_unfused:
                self._warned_unfused = True
                log.warning(f"warning: no engine stage wrote fused graphs into {self.artifacts} and onnx is not "
                            "installed here, so its attention runs as exported (slower prefill); run `halfv-export "
                            "engine` on it with the toolchain")
            return None, 0

    def fuse_into(self, graph: str, target: Path) -> int:
        """The engine stage: write `graph` with its attention fused to `target` (where anything fuses) and run that
        from now on -> the fused sites."""
        rewritten, sites = fused_graph(self.artifacts / graph, self.providers, self.fuse_attention)
        if rewritten is not None:
            write_bytes_atomic(target, rewritten)
            self.fused_files[graph] = target.relative_to(self.artifacts).as_posix()
            self.recorded_sites[graph] = sites
        return sites

    def close(self, graph: str) -> None:
        self._sessions.pop(graph, None)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(graph)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        return dict(zip(names, session.run(names, feeds, run_options_for(session))))


register_target(EngineTarget(
    name="onnxruntime", engine_dir=ORT_DIR,
    build=lambda artifacts, options, log: build_ort_engines(artifacts, options.ep, options.fuse_attention),
    open=lambda artifacts, options: OrtRunner(artifacts, ep=options.ep, threads=options.threads,
                                              fuse_attention=options.fuse_attention),
    summary="ONNX Runtime sessions over one shared weights.bin, optimised at session creation (cpu; cuda / tensorrt EPs with onnxruntime-gpu)"))
