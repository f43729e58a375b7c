"""Qwen2.5-VL vision graph (windows gathered into a padded layout, full-attention blocks unmasked) against
transformers' tower: grids whose windows divide evenly, border windows, a grid smaller than one window, chunked
full attention; the exported ONNX is lint-clean and ONNX Runtime matches the tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halfv_export.graphs import qwen2_5_vl
from halfv_export.graphs.lint import lint_file
from halfv_export.graphs.qwen2_5_vl import segment_tables
from halfv_export.graphs.specs import vision_spec


def pixels_for(loaded, bucket, seed=0):
    ip = loaded.image_processor
    patches = (bucket[0] // ip.patch_size) * (bucket[1] // ip.patch_size)
    width = 3 * ip.temporal_patch_size * ip.patch_size ** 2
    return torch.randn(patches, width, generator=torch.Generator().manual_seed(seed))


def test_segment_tables_pad_border_windows_and_invert():
    cu = torch.tensor([0, 4, 6, 10, 11])  # windows of 4, 2, 4, 1 rows
    gather, scatter, mask = segment_tables(cu, 11)
    assert gather.tolist() == [[0, 1, 2, 3], [4, 5, 11, 11], [6, 7, 8, 9], [10, 11, 11, 11]]
    rows = torch.arange(12.0)  # row 11 is the appended zero row
    assert torch.equal(rows[gather.reshape(-1)][scatter], torch.arange(11.0))
    assert (mask[:, 0, 0] == 0).sum(-1).tolist() == [4, 2, 4, 1]


# (448, 448): 4x4 windows of 64 patches, no padding; (336, 504) and (252, 336): border windows shorter than 64;
# (56, 84): the whole image is one window of 24 patches; (56, 168): windows of 32 and 16 patches.
@pytest.mark.parametrize("bucket, windows, padded", [((448, 448), 16, False), ((336, 504), 15, True),
                                                     ((252, 336), 9, True), ((56, 84), 1, False),
                                                     ((56, 168), 2, True)])
def test_vision_graph_equals_the_model_tower(qwen, bucket, windows, padded):
    adapter, loaded, _ = qwen
    pixels = pixels_for(loaded, bucket)
    with torch.no_grad():
        graph = adapter.vision_graph(loaded, bucket)
        ours = graph(pixels)
        theirs = adapter.eager_vision(loaded, pixels, bucket)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (graph.layouts["window"][0], graph.layouts["window"][2]) == (windows, padded)


def test_chunked_full_attention_equals_the_model_tower(qwen, monkeypatch):
    adapter, loaded, _ = qwen
    bucket = (252, 336)  # 432 patches; a budget of 4 heads x 100 x 432 scores -> 5 query chunks, the last short
    monkeypatch.setattr(qwen2_5_vl, "SCORE_BUDGET", 4 * 100 * 432)
    pixels = pixels_for(loaded, bucket, seed=1)
    with torch.no_grad():
        ours = adapter.vision_graph(loaded, bucket)(pixels)
        theirs = adapter.eager_vision(loaded, pixels, bucket)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_exported_windowed_vision_graph_is_lint_clean_and_matches_onnxruntime(qwen, tmp_path, monkeypatch):
    import onnx
    import onnxruntime as ort

    adapter, loaded, _ = qwen
    bucket = (336, 504)
    monkeypatch.setattr(qwen2_5_vl, "SCORE_BUDGET", 4 * 256 * 864)  # full blocks run in chunks in the graph too
    pixels = pixels_for(loaded, bucket, seed=2)
    spec = vision_spec(adapter.vision_graph(loaded, bucket), pixels, bucket)
    path = spec.export(tmp_path)
    assert lint_file(path) == []
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "Scan", "If", "NonZero", "Equal"}  # no mask built from window ids in the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = adapter.eager_vision(loaded, pixels, bucket).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
