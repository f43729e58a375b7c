"""Bad inputs get one line and the right exit code; a killed build leaves the previous one intact; schedule
parsing, budget arithmetic and image loading hold up under bounded fuzzing. The table below is the README's."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from halfv_export.base.errors import BadInput
from halfv_export.base.data import load_image
from halfv_export.cli.main import cli
from halfv_export.calibration.schedule import check_values, read_schedule
from halfv_export.graphs.pruning import PruneSchedule, budgets
from tests.conftest import make_image


def one_line(result):
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("[", "calibrating"))]
    assert "Traceback" not in result.output
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_qwen_dir):
    """Files for the table: damaged checkpoints, odd images."""
    root = tmp_path_factory.mktemp("bad")
    no_weights = root / "no-weights"
    shutil.copytree(tiny_qwen_dir, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "empty.png").write_bytes(b"")
    Image.new("1", (9000, 8000)).save(root / "huge.png")
    make_image(300, 200).convert("L").save(root / "gray.png")
    make_image(300, 200).convert("RGBA").save(root / "rgba.png")
    Image.fromarray((np.arange(200 * 300).reshape(200, 300) % 65535).astype(np.uint16)).save(root / "deep.png")
    (root / "a-file").write_text("not a folder")
    return root


# (id, args with {placeholders}, exit code, message) -- the README's "Bad inputs" table, row by row
TABLE = [
    ("missing checkpoint dir", "calibrate --backbone qwen2.5-vl --model {bad}/nope --out {tmp}/o", 2,
     "not a directory; pass a local checkpoint directory"),
    ("corrupt checkpoint (config.json)", "calibrate --backbone qwen2.5-vl --model {corrupt} --out {tmp}/o", 2,
     "config.json is not valid JSON"),
    ("unsupported model_type", "calibrate --backbone llava-1.5 --model {tiny} --out {tmp}/o", 2,
     "model_type 'qwen2_5_vl' is not supported by this backbone (expects llava); pick the matching --backbone"),
    ("missing safetensors", "calibrate --backbone qwen2.5-vl --model {bad}/no-weights --out {tmp}/o", 2,
     "no *.safetensors weights found"),
    ("truncated safetensors", "calibrate --backbone qwen2.5-vl --model {truncated} --out {tmp}/o", 2,
     "truncated"),
    ("pickle-only weights", "calibrate --backbone qwen2.5-vl --model {pickled} --out {tmp}/o", 2,
     "only pickle-based weights (pytorch_model.bin) found; they are refused because unpickling can run code"),
    ("schedule of another model", "export --schedule {exported}/schedule.json --model {tiny} --out {tmp}/o", 2,
     "was calibrated for another model (fingerprint mismatch); re-run `halfv-export calibrate` on this model"),
    ("ratio outside (0, 1]", "calibrate --backbone qwen2.5-vl --paper-values --keep-ratio 1.5 --out {tmp}/o", 2,
     "keep_ratio=1.5 must be a number in (0, 1]"),
    ("L1 < 1", "calibrate --backbone qwen2.5-vl --paper-values --ivr-layer 0 --out {tmp}/o", 2,
     "ivr_layer=0 must be >= 1"),
    ("L2 <= L1", "calibrate --backbone qwen2.5-vl --paper-values --ivr-layer 3 --ssr-layer 3 --out {tmp}/o", 2,
     "ssr_layer=3 must be greater than ivr_layer=3"),
    ("L2 >= depth", "calibrate --backbone qwen2.5-vl --paper-values --ssr-layer 8 --out {tmp}/o", 2,
     "ssr_layer=8 must be below the model's depth 8"),
    ("unreadable image", "run --artifacts {exported} --image {bad}/garbage.png --prompt hi", 2,
     "cannot be read (UnidentifiedImageError); pass a PNG/JPEG/WebP image"),
    ("0-byte image", "run --artifacts {exported} --image {bad}/empty.png --prompt hi", 2,
     "is empty (0 bytes); replace the file"),
    ("huge image", "run --artifacts {exported} --image {bad}/huge.png --prompt hi", 2,
     "is 9000x8000, over the 67108864 pixel limit; downscale it first"),
    ("missing image file", "run --artifacts {exported} --image {bad}/nope.png --prompt hi", 2,
     "does not exist; check the path"),
    ("grayscale image", "run --artifacts {exported} --image {bad}/gray.png --prompt hi --max-new-tokens 2", 0,
     "converted to RGB (R = G = B = the gray level)"),
    ("RGBA image", "run --artifacts {exported} --image {bad}/rgba.png --prompt hi --max-new-tokens 2", 0,
     "converted to RGB, alpha composited on white"),
    ("16-bit image", "run --artifacts {exported} --image {bad}/deep.png --prompt hi --max-new-tokens 2", 0,
     "converted to 8-bit RGB, scaled by 255/65535 (not clipped)"),
    ("prompt without an image", "run --artifacts {exported} --prompt hi --max-new-tokens 2", 0, ""),
    ("fewer visual tokens than a budget needs",
     "export --schedule {tiny_budget}/schedule.json --model {tiny} --image-size 56x56 --out {tmp}/o", 2,
     "bucket 56x56 has N=4 visual tokens: K1=1, K2=0 at keep_ratio=0.25; use a larger image size or larger ratios"),
    ("image size off the patch grid", "export --schedule {exported}/schedule.json --image-size 450x450 --out {tmp}/o",
     2, "--image-size 450x450 is not a size the image processor produces (it resizes to 448x448)"),
    ("unknown backbone", "calibrate --backbone gpt-5-vl --out {tmp}/o", 2,
     "unknown backbone 'gpt-5-vl'; choose one of: llava-1.5, llava-next, qwen2.5-vl"),
    ("unknown target", "engine --artifacts {exported} --target tflite", 2,
     "unknown target 'tflite'; choose one of: onnxruntime, tensorrt"),
    ("unwritable output directory", "calibrate --backbone qwen2.5-vl --paper-values --out {bad}/a-file/sub", 2,
     "cannot create output directory"),
    ("TensorRT absent", "engine --artifacts {exported} --target tensorrt", 2, "TensorRT is not installed here"),
]


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_table(row, bad, tiny_qwen_dir, exported, tmp_path, monkeypatch):
    name, args, code, message = row
    if name == "TensorRT absent":
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    paths = {"bad": bad, "tmp": tmp_path, "tiny": tiny_qwen_dir, "exported": exported}
    if "{corrupt}" in args or "{truncated}" in args or "{pickled}" in args:
        ckpt = tmp_path / "ckpt"
        shutil.copytree(tiny_qwen_dir, ckpt)
        if "{corrupt}" in args:
            (ckpt / "config.json").write_text("{not json")
        elif "{truncated}" in args:
            weights = next(ckpt.glob("*.safetensors"))
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        else:
            for f in ckpt.glob("*.safetensors"):
                f.rename(f.with_name("pytorch_model.bin"))
        paths.update(corrupt=ckpt, truncated=ckpt, pickled=ckpt)
    if "{tiny_budget}" in args:
        budget = tmp_path / "budget"
        result = CliRunner().invoke(cli, ["calibrate", "--backbone", "qwen2.5-vl", "--model", str(tiny_qwen_dir),
                                          "--paper-values", "--out", str(budget)])
        assert result.exit_code == 0, result.output
        paths["tiny_budget"] = budget
    result = CliRunner().invoke(cli, args.format(**paths).split())
    assert result.exit_code == code, result.output
    if code:
        line = one_line(result)
        assert line.startswith("Error: ") and message in line, line
    elif "--image" in args:  # accepted images: the conversion the README row promises, pixel by pixel
        image = args.format(**paths).split("--image ")[1].split()[0]
        assert_converted(load_image(image), Image.open(image))


def assert_converted(rgb: Image.Image, original: Image.Image) -> None:
    """load_image's promise per mode: gray -> R = G = B = level; RGBA -> composited on white; 16-bit -> scaled."""
    got = np.asarray(rgb, dtype=np.int64)
    assert rgb.mode == "RGB" and got.shape[:2] == (original.height, original.width)
    src = np.asarray(original, dtype=np.float64)
    if original.mode == "L":
        want = np.repeat(src[..., None], 3, axis=2)
    elif original.mode == "RGBA":
        alpha = src[..., 3:] / 255.0
        want = src[..., :3] * alpha + 255.0 * (1 - alpha)
    else:  # 16-bit grayscale
        want = np.repeat((src / 65535.0 * 255.0)[..., None], 3, axis=2)
    assert np.abs(got - want).max() <= 1.0, original.mode


def test_full_disk_gets_one_line(monkeypatch, tmp_path):
    from halfv_export.base import atomic

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    result = CliRunner().invoke(cli, ["calibrate", "--backbone", "qwen2.5-vl", "--paper-values", "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2
    assert one_line(result).endswith("(No space left on device); free space or choose another --out")
    assert not list((tmp_path / "o").glob("*"))  # nothing half-written left behind


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "calibrate", "--backbone", "nope", "--out", str(tmp_path)])
    assert isinstance(result.exception, BadInput)


@pytest.mark.slow
def test_killed_build_keeps_the_previous_build(tiny_qwen_dir, tiny_qwen_build, tmp_path):
    out = tmp_path / "build"
    args = ["build", "--backbone", "qwen2.5-vl", "--model", str(tiny_qwen_dir), "--image-size", "252x336",
            "--out", str(out)]
    shutil.copytree(tiny_qwen_build, out)  # the previous good build (same command, made once per session)
    manifest = (out / "manifest.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "halfv_export.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the new build is exporting graphs
        if any(p.name.startswith(".staging-") for part in tmp_path.glob(".build.partial-*") for p in part.iterdir()):
            break
        assert proc.poll() is None, "the second build ended before it reached export"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".build.partial-*"))  # its half-done work is off to the side
    assert (out / "manifest.json").read_text() == manifest
    ok = CliRunner().invoke(cli, ["validate", "--artifacts", str(out), "--fail-under", "parity.kept_indices_match=1"])
    assert ok.exit_code == 0, ok.output
    assert CliRunner().invoke(cli, args).exit_code == 0  # a rerun completes and cleans up
    assert not list(tmp_path.glob(".build.*"))


# ------------------------------------------------------------------------------------------- fuzzing (bounded)
FIELD = st.one_of(st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                  st.none(), st.booleans(), st.sampled_from(["topk", "freeze"]))


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["ivr_layer", "keep_ratio", "anchor_ratio", "ssr_layer", "ssr_mode",
                                               "ssr_ratio"]), FIELD), depth=st.integers(2, 40))
def test_schedule_values_are_valid_or_refused_in_one_line(values, depth):
    try:
        sched = check_values(values, depth)
    except BadInput as e:
        assert "\n" not in str(e)
        return
    assert 1 <= sched.ivr_layer < sched.ssr_layer < depth
    assert 0 < sched.keep_ratio <= 1 and 0 < sched.anchor_ratio <= 1
    assert sched.ssr_mode == "freeze" or 0 < sched.ssr_ratio <= 1


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_schedule_file_fuzz(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "schedule.json"
    path.write_text(text)
    with pytest.raises(BadInput):
        read_schedule(path)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["ivr_layer", "keep_ratio", "anchor_ratio", "ssr_layer", "ssr_mode",
                                               "ssr_ratio", "extra"]), FIELD),
       depth=st.one_of(st.integers(-2, 40), st.none(), st.text(max_size=3)))
def test_schedule_documents_reach_the_validator(values, depth, tmp_path_factory):
    """Well-formed schedule.json envelopes with fuzzed fields: every file is either a valid schedule or refused
    in one line by the field validator (not by the JSON or envelope checks)."""
    import json

    doc = {"schema_version": 1, "backbone": "qwen2.5-vl", "model": {"fingerprint": "x", "num_layers": depth},
           "schedule": values}
    path = tmp_path_factory.mktemp("fuzz") / "schedule.json"
    path.write_text(json.dumps(doc))
    try:
        sched, _ = read_schedule(path)
    except BadInput as e:
        assert "\n" not in str(e) and str(e).startswith(f"schedule {path}: "), e  # the validator's own prefix
        return
    assert 1 <= sched.ivr_layer < sched.ssr_layer and (not isinstance(depth, int) or sched.ssr_layer < depth)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 20000), rho=st.integers(1, 100), alpha=st.integers(1, 100), sigma=st.integers(1, 100))
def test_budgets_are_nested(n, rho, alpha, sigma):
    plan = budgets(n, PruneSchedule(2, rho / 100, alpha / 100, 5, "topk", sigma / 100))
    assert 0 <= plan.anchors <= plan.k1 <= n and 0 <= plan.k2 <= plan.k1
    assert plan.k1 == n * rho // 100


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=2048), header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"]))
def test_image_bytes_fuzz(data, header, tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(header + data)
    try:
        image = load_image(path)
    except BadInput as e:
        assert "\n" not in str(e)
        return
    assert image.mode == "RGB"
