"""`halfv-export triton`: the model repository, and a real tritonserver serving it.

Fast: the repository's layout, links and tensor specs against the ONNX graphs themselves (onnx, not the writer's
code path). Slow: the tritonserver binary of the nvidia-pytriton wheel (Triton 2.51, Python backend only, so the
served repositories use `--graph-backend python`), with a venv holding this package's runtime install and numpy < 2
as the stub's environment; clients are tritonclient over HTTP and gRPC (tests/triton_client.py, run in that venv).
Answers are compared with `halfv_export.load(build).generate` on each prompt alone."""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path

import onnx
import pytest

import halfv_export
from halfv_export.base.atomic import write_text_atomic
from halfv_export.base.errors import BadInput
from halfv_export.base.manifest import verify_manifest, write_manifest
from halfv_export.engines import trt as trt_module
from halfv_export.engines.trt_plan import PlanOptions, make_plan
from halfv_export.serving import triton as triton_module
from halfv_export.serving.triton import TritonOptions, write_repository
from tests.conftest import copy_build, make_image
from tests.test_tensorrt import fake_trt  # noqa: F401 (the stand-in tensorrt module, as a fixture)

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "triton_client.py"
PYTRITON = "nvidia-pytriton==0.7.0"  # bundles tritonserver 2.51.0 (NGC 24.10) with the Python backend
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
              onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def config_tensors(text: str, block: str) -> dict:
    """name -> (data_type, dims) of the `input [...]` or `output [...]` block of a config.pbtxt we wrote."""
    body = text.split(f"{block} [\n", 1)[1].split("\n]", 1)[0]
    out = {}
    for line in body.splitlines():
        name = line.split('name: "', 1)[1].split('"', 1)[0]
        kind = line.split("data_type: ", 1)[1].split()[0]
        dims = [int(d) for d in line.split("dims: [", 1)[1].split("]", 1)[0].replace(",", " ").split()]
        out[name] = (kind, dims)
    return out


def onnx_tensors(values) -> dict:
    return {v.name: (ONNX_TYPES[v.type.tensor_type.elem_type],
                     [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
            for v in values}


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_repository_models_follow_the_graphs(engined, tmp_path, backend):
    repo = tmp_path / "repo"
    summary = write_repository(engined, repo, TritonOptions(graph_backend=backend))
    meta = json.loads((engined / "artifacts.json").read_text())
    assert set(summary["models"]) == {"halfv", "halfv_stream"} | {f"halfv_{Path(g).stem}" for g in meta["graphs"]}
    verify_manifest(repo / "halfv" / "build")  # the build inside, every sha256
    calls = json.loads((repo / "halfv" / "graphs.json").read_text())
    for graph in meta["graphs"]:
        folder = repo / f"halfv_{Path(graph).stem}"
        text = (folder / "config.pbtxt").read_text()
        model = onnx.load(str(engined / graph), load_external_data=False).graph
        initializers = {i.name for i in model.initializer}
        assert config_tensors(text, "input") == onnx_tensors(v for v in model.input if v.name not in initializers)
        assert config_tensors(text, "output") == onnx_tensors(model.output)
        assert calls[graph]["inputs"] == [v.name for v in model.input if v.name not in initializers]
        assert "max_batch_size: 0" in text and f'backend: "{backend}"' in text
        if backend == "onnxruntime":
            # links inside the repository to the one copy of the graph and of weights.bin
            assert (folder / "1" / "model.onnx").is_symlink()
            assert (folder / "1" / "model.onnx").samefile(repo / "halfv" / "build" / graph)
            assert (folder / "1" / "weights.bin").samefile(repo / "halfv" / "build" / "weights.bin")
            assert not os.path.isabs(os.readlink(folder / "1" / "model.onnx"))
        else:
            assert 'key: "graph" value { string_value: "' + graph + '" }' in text
    streaming = (repo / "halfv_stream" / "config.pbtxt").read_text()
    assert "decoupled: true" in streaming and "dynamic_batching" in streaming


def test_tensor_specs_without_onnx_are_the_same(engined, tmp_path, monkeypatch):
    """The runtime install reads the graphs' I/O from ONNX Runtime's session metadata instead of onnx."""
    with_onnx = write_repository(engined, tmp_path / "a")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    write_repository(engined, tmp_path / "b")
    for model in with_onnx["models"]:
        assert (tmp_path / "a" / model / "config.pbtxt").read_text() == \
            (tmp_path / "b" / model / "config.pbtxt").read_text()


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.lstat().st_ino, p.lstat().st_size) for p in folder.rglob("*")}


def test_bad_options_and_folders_are_one_line_and_leave_the_previous_repository(engined, tmp_path, run_cli,
                                                                                 monkeypatch):
    repo = tmp_path / "repo"
    write_repository(engined, repo)
    before = snapshot(repo)
    with pytest.raises(BadInput, match="unknown graph backend"):
        write_repository(engined, repo, TritonOptions(graph_backend="tensorflow"))
    with pytest.raises(BadInput, match="--kind gpu needs --graph-backend onnxruntime"):
        write_repository(engined, repo, TritonOptions(graph_backend="python", kind="gpu"))
    result = run_cli("triton", "--artifacts", tmp_path / "nothing", "--out", repo)
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nothing'} has no artifacts.json; pass the --out folder of `halfv-export build`"]
    # a write that fails half-way (the third graph's tensors cannot be read) leaves the previous repository whole
    real, calls = triton_module.graph_io, []

    def third_fails(path):
        calls.append(path)
        if len(calls) == 3:
            raise BadInput(f"{path.name}: cannot read it")
        return real(path)

    monkeypatch.setattr(triton_module, "graph_io", third_fails)
    with pytest.raises(BadInput, match="cannot read it"):
        write_repository(engined, repo)
    monkeypatch.undo()
    assert snapshot(repo) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no partial folder left
    # --out must not overlap the build, nor replace a folder this command did not write
    for out in (engined, engined / "repo", engined.parent):
        with pytest.raises(BadInput, match="overlaps the build"):
            write_repository(engined, out)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="is not a repository written by `halfv-export triton`"):
        write_repository(engined, other)
    assert (other / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- a real tritonserver
def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def triton_env(tmp_path_factory):
    """The tritonserver tree from the wheel (as pytriton lays it out) and a venv for the Python backend's stub: this
    package's runtime install, numpy < 2 (the stub's requirement), tritonclient."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("the Python backend's stub links libpython, and this Python has no shared library")
    root = tmp_path_factory.mktemp("triton")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PYTRITON, "-d", str(root)],
                   check=True, timeout=900)
    wheel = next(root.glob("nvidia_pytriton-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))]
        archive.extractall(root / "wheel", names)
    tree = root / "wheel" / "pytriton" / "tritonserver"
    stub = tree / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    (tree / "backends" / "python" / stub.name).write_bytes(stub.read_bytes())
    for binary in (tree / "bin" / "tritonserver", tree / "backends" / "python" / stub.name):
        binary.chmod(0o755)
    env = root / "env"
    subprocess.run([sys._base_executable, "-m", "venv", str(env)], check=True, timeout=300)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(ROOT), "numpy<2", "tritonclient[http,grpc]==2.73.0"], check=True, timeout=1800)
    return {"tree": tree, "env": env, "libs": root / "wheel" / "nvidia_pytriton.libs"}


@contextmanager
def tritonserver(triton_env, repo: Path):
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PATH": f"{triton_env['env'] / 'bin'}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": f"{sysconfig.get_config_var('LIBDIR')}:{triton_env['libs']}"}
    tree = triton_env["tree"]
    log = repo.parent / f"{repo.name}.tritonserver.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(tree / "bin" / "tritonserver"), f"--model-repository={repo}",
             f"--backend-directory={tree / 'backends'}",
             f"--cache-directory={tree / 'caches'}", "--http-address=127.0.0.1", f"--http-port={http}",
             "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--metrics-address=127.0.0.1",
             f"--metrics-port={metrics}", "--allow-gpu-metrics=false"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail(f"tritonserver not ready in 120 s: {log.read_text()[-3000:]}")
        yield {"http": http, "grpc": grpc}
    finally:
        server.terminate()  # by PID, never by name
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def client(triton_env, *args) -> object:
    result = subprocess.run([str(triton_env["env"] / "bin" / "python"), str(CLIENT), *[str(a) for a in args]],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def image_cases(folder: Path, count: int, max_tokens: int) -> tuple[Path, list]:
    """`count` different images (the two buckets, odd sizes that `run` fits to them) with task-like prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(448, 448), (336, 504), (333, 517), (300, 517), (460, 450), (97, 131)]
    prompts = ["What is this?", "Read the digits.", "How many digits are there?", "Describe the picture."]
    cases = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        path = folder / f"{i:02d}-{h}x{w}.png"
        make_image(w, h, 100 + i).save(path)
        cases.append({"image": str(path), "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens})
    (folder / "cases.json").write_text(json.dumps(cases))
    return folder / "cases.json", cases


@pytest.mark.slow
def test_tritonserver_answers_like_run_alone_and_streams_and_refuses_bad_requests(engined, triton_env, tmp_path):
    repo = tmp_path / "repo"
    write_repository(engined, repo, TritonOptions(graph_backend="python", max_batch=8))
    cases_file, cases = image_cases(tmp_path / "images", 16, 8)
    text_only = [{"image": None, "prompt": "Say hello.", "max_tokens": 8}]
    (tmp_path / "text.json").write_text(json.dumps(text_only))
    model = halfv_export.load(engined)
    alone = [model.generate(c["image"], c["prompt"], max_new_tokens=c["max_tokens"]) for c in cases + text_only]
    with tritonserver(triton_env, repo) as ports:
        answers = client(triton_env, "infer", ports["http"], cases_file)  # 16 at once: Triton batches them
        assert [a[0] for a in answers] == [c.text for c in alone[:16]]
        stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/models/halfv/stats"))
        counts = stats["model_stats"][0]
        assert counts["inference_count"] == 16 and counts["execution_count"] < 16  # some ran in one batch
        assert [a[1] for a in answers] == [c.finish_reason for c in alone[:16]]
        assert client(triton_env, "infer", ports["http"], tmp_path / "text.json")[0][0] == alone[16].text
        streamed = client(triton_env, "stream", ports["grpc"], cases_file)
        assert ["".join(p for p in pieces) for pieces in streamed] == [c.text for c in alone[:16]]
        assert max(len(pieces) for pieces in streamed) > 2  # token pieces, not one answer
        bad = client(triton_env, "bad", ports["http"])  # sent at once: bad and good requests share batches
        assert [status for status, _ in bad[:5]] == ["400"] * 5
        messages = [message for _, message in bad[:5]]
        assert all("\n" not in m for m in messages)
        assert "image cannot be read" in messages[0] and "the prompt has" in messages[1]
        assert "exceeds the 8192-token context" in messages[1]
        assert "max_tokens must be between 1 and 8192, not 0" in messages[2]
        assert "not 100000" in messages[3] and "has no `prompt` input" in messages[4]
        hello = ["ok", model.generate(None, "Say hello.", max_new_tokens=4).text]
        assert bad[5] == hello and bad[6] == hello  # the good request in the burst, and one after it


@pytest.mark.slow
def test_a_llava_repository_serves_and_every_config_parses(triton_env, run_cli, engined, llava_build, fake_trt,
                                                          tmp_path):
    llava = llava_build  # the paper's schedule, exported and through the engine stage (and validated)
    repos = {}
    for name, build in (("qwen", engined), ("llava", llava)):
        for backend in ("onnxruntime", "python"):
            repos[name, backend] = tmp_path / f"repo-{name}-{backend}"
            result = run_cli("triton", "--artifacts", build, "--out", repos[name, backend], "--graph-backend", backend)
            assert result.exit_code == 0, result.output
    art, plan = planned(engined, tmp_path / "planned")
    repos["qwen", "tensorrt"] = tmp_path / "repo-qwen-tensorrt"
    write_repository(art, repos["qwen", "tensorrt"], TritonOptions(graph_backend="tensorrt"))
    files = sorted(str(p) for repo in repos.values() for p in repo.glob("*/config.pbtxt"))
    parsed = client(triton_env, "config", *files)  # Triton's own schema: a misspelt field or enum fails here
    assert [p["name"] for p in parsed] == [Path(f).parent.name for f in files]
    assert [p["decoupled"] for p in parsed if p["name"] == "halfv_stream"] == [True] * 5
    trt = {p["name"]: p for p, f in zip(parsed, files) if "repo-qwen-tensorrt" in f and p["backend"] == "tensorrt"}
    assert {name: (p["kind"], p["profiles"]) for name, p in trt.items()} == {
        f"halfv_{Path(g.graph).stem}": ("KIND_GPU", [str(i) for i in range(len(g.profiles))] if len(g.profiles) > 1
                                        else []) for g in plan.graphs}
    cases_file, cases = image_cases(tmp_path / "images", 4, 6)
    model = halfv_export.load(llava)
    with tritonserver(triton_env, repos["llava", "python"]) as ports:
        answers = client(triton_env, "infer", ports["http"], cases_file)
    assert [a[0] for a in answers] == [model.generate(c["image"], c["prompt"], max_new_tokens=6).text for c in cases]


def test_the_orchestrator_config_names_the_build_it_serves(engined, tmp_path):
    repo = tmp_path / "repo"
    write_repository(engined, repo)
    for name in ("halfv", "halfv_stream"):
        text = (repo / name / "config.pbtxt").read_text()
        build = text.split('key: "build" value { string_value: "', 1)[1].split('"', 1)[0]
        assert (repo / name / build).resolve() == (repo / triton_module.ORCHESTRATOR / triton_module.BUILD_DIR)


# ---------------------------------------------------------------------------------------------- TensorRT plans
def planned(engined, folder: Path):
    """A copy of the build with trt/ plans from the stand-in TensorRT (tests/test_tensorrt.py): real plan files,
    engine.json and manifest, as `engine --target tensorrt` leaves them."""
    art = copy_build(engined, folder)
    plan = make_plan(art, PlanOptions())
    trt_module.build_trt_engines(art, plan, log=lambda message: None)
    write_manifest(art)
    return art, plan


def test_a_tensorrt_repository_serves_the_plans_with_every_profile(engined, fake_trt, run_cli, tmp_path):
    art, plan = planned(engined, tmp_path / "art")
    repo = tmp_path / "repo"
    result = run_cli("triton", "--artifacts", art, "--out", repo, "--graph-backend", "tensorrt", "--instances", "2")
    assert result.exit_code == 0, result.output
    assert "plans for Fake H100, sm 9.0, TensorRT 10.99.0-fake" in result.output
    assert {g.graph for g in plan.graphs} == set(json.loads((art / "artifacts.json").read_text())["graphs"])
    for graph in plan.graphs:
        folder = repo / f"halfv_{Path(graph.graph).stem}"
        text = (folder / "config.pbtxt").read_text()
        assert 'backend: "tensorrt"' in text and 'default_model_filename: "model.plan"' in text
        group = text.split("instance_group [ { ", 1)[1].split(" } ]", 1)[0]
        profiles = " profile: [ " + ", ".join(f'"{i}"' for i in range(len(graph.profiles))) + " ]"
        assert group == "count: 2 kind: KIND_GPU" + (profiles if len(graph.profiles) > 1 else "")
        model = onnx.load(str(art / graph.graph), load_external_data=False).graph
        initializers = {i.name for i in model.initializer}
        assert config_tensors(text, "input") == onnx_tensors(v for v in model.input if v.name not in initializers)
        assert config_tensors(text, "output") == onnx_tensors(model.output)
        link = folder / "1" / "model.plan"
        assert not os.path.isabs(os.readlink(link)) and link.samefile(repo / "halfv" / "build" / graph.engine)
        assert link.read_bytes() == (art / graph.engine).read_bytes()
        assert not (folder / "1" / "model.onnx").exists() and not (folder / "1" / "weights.bin").exists()
    assert any(len(g.profiles) > 1 for g in plan.graphs)  # the profile list above was exercised


def test_tensorrt_repositories_refuse_plans_that_would_not_load(engined, fake_trt, tmp_path):
    art, plan = planned(engined, tmp_path / "art")
    repo = tmp_path / "repo"
    write_repository(art, repo, TritonOptions(graph_backend="tensorrt"))
    before = snapshot(repo)
    with pytest.raises(BadInput, match="TensorRT plans run on the GPU they were built on; use --kind gpu"):
        write_repository(art, repo, TritonOptions(graph_backend="tensorrt", kind="cpu"))
    with pytest.raises(BadInput, match=r"has no TensorRT engines; run `halfv-export engine --artifacts .* --target "
                                       r"tensorrt`"):
        write_repository(engined, repo, TritonOptions(graph_backend="tensorrt"))
    info_path = art / "trt" / "engine.json"
    info = json.loads(info_path.read_text())
    info["plan"]["graphs"][1]["onnx_sha256"] = "0" * 64  # a plan built from an earlier export of its graph
    write_text_atomic(info_path, json.dumps(info))  # a new file, as every write here is: the repository's hard
    write_manifest(art)  # link keeps the old one
    with pytest.raises(BadInput, match=f"{info['plan']['graphs'][1]['engine']} was built from another "
                                       f"{info['plan']['graphs'][1]['graph']} than the one in"):
        write_repository(art, repo, TritonOptions(graph_backend="tensorrt"))
    assert snapshot(repo) == before
