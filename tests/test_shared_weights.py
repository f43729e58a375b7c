"""Weights stored once: every graph references one weights.bin, ORT sessions share it, the manifest's fast check."""

import json
import os
import shutil
from pathlib import Path

import onnx

from halfv_export.base import manifest as manifest_module
from halfv_export.engines.ort import OrtRunner
from halfv_export.graphs.shared_weights import ALIGN, MIN_SHARED_BYTES, WEIGHTS_FILE, read_index
from halfv_export.graphs.specs import DECODE, DECODE_FULL, PREFILL, PREFILL_FULL

LLM_GRAPHS = (PREFILL.file((448, 448)), PREFILL.file((336, 504)), PREFILL_FULL.file(), DECODE.file(),
              DECODE_FULL.file())


def external_refs(path):
    """name -> (location, offset, length) of every external initializer of a graph."""
    model = onnx.load(str(path), load_external_data=False)
    refs = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            refs[init.name] = (info["location"], int(info["offset"]), int(info["length"]))
    return refs, model


def test_every_graph_reads_one_weights_file(exported, qwen):
    _, loaded, _ = qwen
    meta = json.loads((exported / "artifacts.json").read_text())
    index = read_index(exported)
    size = (exported / WEIGHTS_FILE).stat().st_size
    assert index["bytes"] == size == meta["weights"]["bytes"]
    assert not list(exported.glob("*.data"))  # no graph keeps its own copy
    params = dict(loaded.model.named_parameters())
    layer_weights = {n for n, p in params.items() if ".language_model.layers." in n and p.dim() == 2}
    assert layer_weights
    for graph in meta["graphs"]:
        refs, model = external_refs(exported / graph)
        for name, (location, offset, length) in refs.items():
            entry = index["tensors"][name]
            assert (location, offset, length) == (WEIGHTS_FILE, entry["offset"], entry["length"]), (graph, name)
            assert offset % ALIGN == 0 and offset + length <= size
        inline = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
        assert all(len(i.raw_data) < MIN_SHARED_BYTES for i in inline), graph
        if graph in LLM_GRAPHS:  # every decoder matrix comes from the shared file, under its parameter name
            assert layer_weights <= refs.keys(), (graph, sorted(layer_weights - refs.keys())[:3])
    # stored once: the file holds each parameter once (plus page alignment), although five LLM graphs use them
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    derived = sum(e["length"] for e in index["tensors"].values() if not e["parameter"])  # index tables, rotary
    assert size <= param_bytes + derived + ALIGN * len(index["tensors"])
    assert meta["weights"]["referenced_bytes"] > 4 * sum(
        index["tensors"][n]["length"] for n in layer_weights)
    # every stored tensor equals the parameter it is named after
    for name, entry in index["tensors"].items():
        if entry["parameter"]:
            assert params[name].detach().numpy().tobytes() == _read(exported / WEIGHTS_FILE, entry), name


def _read(path, entry):
    with open(path, "rb") as f:
        f.seek(entry["offset"])
        return f.read(entry["length"])


def test_sessions_share_the_memory_mapped_weights(exported):
    runner = OrtRunner(exported)
    assert runner.shared_file == exported / WEIGHTS_FILE
    refs, _ = external_refs(exported / DECODE.file())
    shared = runner._shared.values
    assert refs.keys() <= shared.keys()
    # the OrtValue handed to every session is a view of the mapped file, not a copy
    name = next(iter(refs))
    assert shared[name].numpy().tobytes() == _read(exported / WEIGHTS_FILE, read_index(exported)["tensors"][name])
    for graph in (DECODE.file(), DECODE_FULL.file()):
        assert runner.session(graph) is not None


def prepacking(options) -> bool:
    try:
        return options.get_session_config_entry("session.disable_prepacking") != "1"
    except RuntimeError:  # not set: ONNX Runtime's default, on
        return True


def test_a_one_bucket_tower_packs_its_own_weights_without_planner_reuse(exported, tmp_path, monkeypatch):
    """A CPU vision session (engines/ort.tower_options) runs without the planner's buffer reuse and has its arena
    shrunk after each run; in a one-bucket build it reads and prepacks its own weights, with several buckets it
    shares the mapping unpacked like the LLM graphs. Its output is what a plain ONNX Runtime session gives."""
    import numpy as np
    import onnxruntime as ort

    from halfv_export.engines import ort as ort_engine

    given = {}  # graph -> the shared weights its session was opened with
    real = ort_engine.open_session
    monkeypatch.setattr(ort_engine, "open_session", lambda path, options, providers, shared=None, fused=None: (
        given.__setitem__(Path(path).name, shared), real(path, options, providers, shared, fused))[1])
    meta = json.loads((exported / "artifacts.json").read_text())
    vision = meta["buckets"][0]["vision"]
    one = tmp_path / "one"  # the build as if it had only its first bucket
    shutil.copytree(exported, one)
    (one / "artifacts.json").write_text(json.dumps({**meta, "graphs": [g for g in meta["graphs"] if not
                                                                       g.startswith("vision_") or g == vision]}))
    runner = OrtRunner(one)
    tower = runner.session(vision)
    options = tower.get_session_options()
    assert (options.enable_mem_reuse, options.enable_mem_pattern, options.enable_cpu_mem_arena) == (False, False, True)
    assert options.execution_order == ort.ExecutionOrder.PRIORITY_BASED  # the graph's order, not a walk back
    assert prepacking(options) and given[vision] is None
    decode = runner.session(DECODE.file())
    assert given[DECODE.file()] is runner._shared and not prepacking(decode.get_session_options())
    assert decode.get_session_options().enable_mem_reuse
    assert decode.get_session_options().execution_order == ort.ExecutionOrder.DEFAULT
    shrink = ort_engine.run_options_for(tower)
    assert shrink.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert ort_engine.run_options_for(decode) is None
    assert not PREFILL.holds(PREFILL_FULL.file()) and PREFILL.holds(PREFILL.file((448, 448)))  # labels are HxW
    pixels = np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in tower.get_inputs()[0].shape]).astype(np.float32)
    ours = next(iter(runner.run(vision, {"pixel_values": pixels}).values()))
    plain = ort.InferenceSession(str(exported / vision), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, plain.run(None, {"pixel_values": pixels})[0], rtol=0, atol=1e-5)
    # two buckets (the build as exported): towers share the mapping, unpacked (one copy of the weights)
    assert sum(g.startswith("vision_") for g in meta["graphs"]) == 2
    runner = OrtRunner(exported)
    options = runner.session(vision).get_session_options()
    assert given[vision] is runner._shared and not prepacking(options) and not options.enable_mem_reuse


def test_a_session_outlives_the_runner_that_opened_it(exported):
    """A caller may keep runner.session(graph) and drop the runner: the session keeps the weights' mapping alive
    (before, its next run read unmapped pages and crashed). In a subprocess, so that a crash cannot take pytest."""
    import subprocess
    import sys

    import numpy as np

    code = ("import gc, sys, numpy as np; from pathlib import Path; from halfv_export.engines.ort import OrtRunner; "
            "s = OrtRunner(Path(sys.argv[1])).session('embed.onnx'); gc.collect(); "
            "print(repr(float(s.run(None, {'input_ids': np.arange(4, dtype=np.int64)[None]})[0].astype(np.float64)"
            ".sum())))")
    done = subprocess.run([sys.executable, "-c", code, str(exported)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    live = OrtRunner(exported).run("embed.onnx", {"input_ids": np.arange(4, dtype=np.int64)[None]})
    assert float(done.stdout.strip()) == float(next(iter(live.values())).astype(np.float64).sum())


def test_fast_check_guarantees_what_the_readme_says(exported, run_cli, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    weights = copy / WEIGHTS_FILE
    # the fast check samples large files; make weights.bin "large" for this test
    monkeypatch.setattr(manifest_module, "SAMPLE_ALL_BYTES", 4 << 20)  # graphs are smaller, weights.bin larger
    monkeypatch.setattr(manifest_module, "SAMPLES", 2)
    monkeypatch.setattr(manifest_module, "SAMPLE_BYTES", 4096)
    result = run_cli("engine", "--artifacts", copy, "--target", "onnxruntime")  # re-writes the manifest with samples
    assert result.exit_code == 0, result.output
    manifest = json.loads((copy / "manifest.json").read_text())
    assert WEIGHTS_FILE in manifest["samples"] and not any(n.endswith(".onnx") for n in manifest["samples"])
    # the engine stage adds no copy of the weights: its fused graphs (ort/) keep every large tensor in weights.bin
    engine = json.loads((copy / "ort" / "engine.json").read_text())
    assert sorted(engine["fused_graphs"]) == sorted(p.name for p in (copy / "ort").glob("*.onnx"))
    assert engine["fused_graphs"], "the CPU engine stage fuses the prefill graphs' attention"
    for name in engine["fused_graphs"]:
        graph = onnx.load(str(copy / "ort" / name), load_external_data=False).graph
        inline = [i.name for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL
                  and len(i.raw_data) >= MIN_SHARED_BYTES]
        assert not inline, (name, inline)
    # a same-size edit between the sampled blocks: `run` (fast) does not see it, `validate` (full) refuses it
    middle = weights.stat().st_size // 2
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ran = run_cli("run", "--artifacts", copy, "--prompt", "hi", "--max-new-tokens", 1)
    assert ran.exit_code == 0, ran.output
    refused = run_cli("validate", "--artifacts", copy)
    assert refused.exit_code == 2 and "weights.bin does not match its sha256" in refused.output
    # a truncated or damaged first block: the fast check refuses it
    with open(weights, "r+b") as f:
        f.write(b"\0" * 16)
    assert "does not match its sha256" in run_cli("run", "--artifacts", copy, "--prompt", "hi").output
    with open(weights, "r+b") as f:
        f.truncate(middle)
    result = run_cli("run", "--artifacts", copy, "--prompt", "hi")
    assert result.exit_code == 2 and "does not match its sha256" in result.output


def test_store_keeps_one_copy_of_equal_and_transposed_weights(tmp_path):
    """Hand-made graphs: equal tensors under two names in one graph (random-init norms are all ones), the same
    weight in two graphs, and a constant-folded W^T; the store keeps each once and the graphs still compute the
    same thing in ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from halfv_export.graphs.shared_weights import WeightStore, parameter_names

    linear = torch.nn.Linear(32, 16, bias=False)
    norm = torch.nn.Parameter(torch.ones(32))
    module = torch.nn.Module()
    module.proj, module.norm_a, module.norm_b = linear, norm, torch.nn.Parameter(torch.ones(32))
    w = linear.weight.detach().numpy()  # [16, 32]

    ones_big = np.ones((16, 32), np.float32)  # >= MIN_SHARED_BYTES, equal content under two names

    def graph(name, folded):
        inits = [numpy_helper.from_array(ones_big, "a"), numpy_helper.from_array(ones_big.copy(), "b")]
        if folded:  # what torch.onnx's constant folding leaves: W^T as its own initializer
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "val_7"))
            nodes = [helper.make_node("MatMul", ["x", "val_7"], ["y0"])]
        else:
            inits.append(numpy_helper.from_array(w, "weight"))
            nodes = [helper.make_node("Transpose", ["weight"], ["wt"], perm=[1, 0]),
                     helper.make_node("MatMul", ["x", "wt"], ["y0"])]
        nodes += [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("MatMul", ["y0", "ab"], ["y"])]
        g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0,
                  location=f"{name}.onnx.data")
        return path

    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    expected = (x @ w.T) @ (2 * ones_big)
    paths = [graph("g1", folded=True), graph("g2", folded=False)]
    store = WeightStore(tmp_path, parameter_names(module))
    for path in paths:
        store.absorb(path)
    index = store.close()
    assert not list(tmp_path.glob("*.data"))
    assert set(index["tensors"]) == {"proj.weight", "derived/a"}  # W once, the ones once (norms are < 1 KiB)
    assert index["tensors"]["proj.weight"]["parameter"] and not index["tensors"]["derived/a"]["parameter"]
    for path in paths:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(["y"], {"x": x})[0], expected, rtol=1e-5, atol=1e-5)

