"""Prefill and greedy decoding over exported graphs. The host side (tokenizer, chat template, image preprocessing,
rope positions) is the build folder's own, in numpy (host/builds.py: no torch, no transformers; tests hold it equal
to the adapters the eager path uses). Works on any Runner: `run(graph, feeds) -> outputs`.

Between graphs, tensors stay in the runner's own array type (`runner.arrays`: numpy for ONNX Runtime, torch CUDA
tensors for TensorRT): embeds, the K/V cache and the valid masks never visit the host, so a decode step moves only
the B new token ids and positions to the device and the B chosen ids back. `EngineState` holds runner arrays;
`to_host` gives the host a numpy copy (reports, parity checks); `generate` returns host token ids."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base.artifact_files import DECODE, DECODE_FULL, EMBED, PREFILL_FULL
from ..base.errors import BadInput
from ..base.greedy import Greedy
from ..host.builds import BuildHost, host_for
from ..host.inputs import PAD_MULTIPLE, HostArrays, align_left, cut_rows
from .base import Runner, arrays_of


# the exported graphs' floating dtype per --precision, as torch / numpy name it
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Prompt:
    """What one prefill runs: its rows, their embeddings (runner array), and the visual tokens a vision cut kept."""

    host: HostArrays
    embeds: Any  # [B, S, D]
    visual_tokens: np.ndarray | None = None  # [B, K] raster indices into the image's N tokens; None: all kept


@dataclass
class EngineState:
    """Runner arrays (see the module docstring), except next_positions, which the host advances."""

    logits: Any  # [B, V]
    kept: dict  # stage -> [B, K]: "vision" (a cut build's tower), "ivr", "ssr" (indices into the prefill's rows)
    past: list  # per layer: key, value
    valid: list  # per cache-length group [B, len_g]
    next_positions: np.ndarray  # [P, B] host int64
    decode_graph: str
    groups: list


class EnginePipeline:
    def __init__(self, artifacts: Path, runner: Runner):
        self.artifacts = Path(artifacts)
        meta_path = self.artifacts / "artifacts.json"
        if not meta_path.exists():
            raise BadInput(f"{self.artifacts} has no artifacts.json; run `halfv-export export` into it first")
        self.meta = json.loads(meta_path.read_text())
        self.host_side: BuildHost = host_for(self.artifacts, self.meta)
        self.runner = runner
        self.buckets = {tuple(b["size"]): b for b in self.meta["buckets"]}
        precision = self.meta.get("precision", "fp32")
        if precision == "bf16" and not runner.runs_bf16:
            raise BadInput("these graphs are bf16, which ONNX Runtime's CPU provider does not run; use "
                           "--target tensorrt, or export with --precision fp16 / fp32")
        self.float_dtype = FLOAT_DTYPES.get(precision, "float32")  # the graphs' pixel / embeds / K/V dtype
        self.arrays = arrays_of(runner)

    # the toolchain's view of the same folder (validate, reports, tests): imported on first use, so that `run` and
    # `serve` never load torch or transformers
    @functools.cached_property
    def adapter(self):
        from ..graphs import get_adapter

        return get_adapter(self.meta["backbone"])

    @functools.cached_property
    def processing(self):
        return self.adapter.load_processing(self.artifacts)

    def to_host(self, array) -> np.ndarray:
        """A runner array as host numpy (bf16 widened to fp32), for reports and comparisons."""
        return self.arrays.to_host(array)

    # -------------------------------------------------------------------------------------------- inputs
    def fit_image(self, image):
        """Resize an image whose natural bucket was not exported to the exported bucket of closest aspect ratio."""
        if image is None:
            return None
        natural = self.host_side.bucket_for((image.height, image.width))
        if natural in self.buckets:
            return image
        aspect = image.width / image.height
        h, w = min(self.buckets, key=lambda b: (abs(np.log((b[1] / b[0]) / aspect)), -b[0] * b[1]))
        return image.resize((w, h))

    def host(self, images: list, prompts: list[str]) -> HostArrays:
        """The prompt rows every consumer of the graphs runs (run, the API, serve, and validate's parity gate):
        the build's host inputs, left-padded to a multiple of PAD_MULTIPLE (host/inputs.py: a prompt's logits are
        then bit-identical in any batch)."""
        host = self.host_side.host_inputs([self.fit_image(im) for im in images], prompts)
        return align_left(host, PAD_MULTIPLE, self.pad_id)

    @functools.cached_property
    def pad_id(self) -> int:
        """The id left padding writes (masked; 0 where the tokenizer has no pad token)."""
        pad_id = self.host_side.tokenizer.pad_token_id
        return 0 if pad_id is None else int(pad_id)

    # -------------------------------------------------------------------------------------------- prefill
    @property
    def vision_cut(self) -> dict | None:
        """The build's vision cut ({"block", "keep"}: export --vision-cut, graphs/vision_cut.py), or None."""
        return self.meta.get("vision_cut")

    def towers(self, host, halfv: bool = True) -> list[dict]:
        """Per image, the vision graph's outputs as runner arrays: visual_features [N or K, D], and with a cut
        (HalfV side of a cut build) visual_tokens [K]. --full runs a cut build's uncut tower."""
        bucket = self.buckets[host.bucket]
        graph = bucket["vision"] if halfv else bucket.get("vision_full", bucket["vision"])
        # the vision graph was traced with pixels in the export precision; cast on the host, copy once
        return [self.runner.run(graph, {"pixel_values": self.arrays.asarray(pixels, self.float_dtype)})
                for pixels in host.pixel_values]

    def prompt(self, host: HostArrays, halfv: bool = True) -> "Prompt":
        """The rows a prefill runs and their [B, S, D] embeddings (runner array): token embeddings with each
        image's visual features written over its span. On the HalfV side of a cut build the tower keeps K tokens
        and the rows keep only theirs (host/inputs.cut_rows, as the eager reference cuts them)."""
        towers = self.towers(host, halfv) if host.num_visual > 0 else []
        tokens = None
        if towers and "visual_tokens" in towers[0]:
            tokens = np.stack([self.to_host(t["visual_tokens"]) for t in towers]).astype(np.int64)  # [B, K]
            host = cut_rows(host, tokens, self.pad_id)
        arrays = self.arrays
        embeds = self.runner.run(EMBED.file(), {"input_ids": arrays.asarray(host.input_ids, "int64")})["embeds"]
        for b, tower in enumerate(towers):
            s = int(host.visual_start[b])
            embeds[b, s:s + host.num_visual] = tower["visual_features"]
        return Prompt(host, embeds, tokens)

    def prefill(self, host, halfv: bool = True, prompt: "Prompt | None" = None) -> EngineState:
        """`prompt`: this host's prompt(host, halfv), already made (latency timings reuse one)."""
        pruned = halfv and host.num_visual > 0
        graph = self.buckets[host.bucket]["prefill"] if pruned else PREFILL_FULL.file()
        arrays = self.arrays
        prompt = self.prompt(host, halfv) if prompt is None else prompt
        rows = prompt.host
        feeds = {"embeds": prompt.embeds,
                 "attention_mask": arrays.asarray(rows.attention_mask, "int64"),
                 "positions": arrays.asarray(rows.positions, "int64"),
                 "visual_start": arrays.asarray(rows.visual_start, "int64")}
        out = self.runner.run(graph, feeds)
        layers = self.meta["num_layers"]
        groups = self.meta["groups"] if pruned else [0] * layers
        kept = {k[5:]: out[k] for k in ("kept_ivr", "kept_ssr") if k in out}
        if prompt.visual_tokens is not None:
            kept["vision"] = arrays.asarray(prompt.visual_tokens, "int64")
        return EngineState(
            logits=out["logits"], kept=kept,
            past=[out[f"present_{kind}_{i}"] for i in range(layers) for kind in ("key", "value")],
            valid=[out[f"cache_valid_{g}"] for g in sorted(set(groups))],
            next_positions=host.next_positions, decode_graph=(DECODE if pruned else DECODE_FULL).file(),
            groups=groups)

    # -------------------------------------------------------------------------------------------- decode
    def decode_step(self, tokens, state: EngineState):
        """One token per sample (host ids or runner array [B]) -> logits [B, V]; the cache stays on the runner."""
        arrays = self.arrays
        batch = tokens.shape[0]
        state.valid = [arrays.concat([v, arrays.ones((batch, 1), like=v)], axis=1) for v in state.valid]
        feeds = {"input_ids": arrays.asarray(tokens.reshape(batch, 1), "int64"),
                 "positions": arrays.asarray(state.next_positions[..., None], "int64")}
        feeds.update({f"cache_valid_{g}": v for g, v in enumerate(state.valid)})
        layers = self.meta["num_layers"]
        for i in range(layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = state.past[2 * i], state.past[2 * i + 1]
        out = self.runner.run(state.decode_graph, feeds)
        state.past = [out[f"present_{kind}_{i}"] for i in range(layers) for kind in ("key", "value")]
        state.next_positions = state.next_positions + 1
        state.logits = out["logits"]
        return state.logits

    def generate(self, images: list, prompts: list[str], max_new_tokens: int, halfv: bool = True,
                 stop_at_eos: bool = True) -> np.ndarray:
        """Greedy tokens [B, <= max_new_tokens] through the shared loop (base/greedy.py); a finished sample
        repeats its EOS up to the longest answer."""
        eos = set(self.meta["eos_token_ids"]) if stop_at_eos else set()
        state = self.prefill(self.host(images, prompts), halfv)
        return Greedy(EngineStepper(self, state), [max_new_tokens] * len(prompts), eos).run().tokens()

    def decode_text(self, token_ids) -> str:
        return self.host_side.decode([int(t) for t in token_ids])


class EngineStepper:
    """base/greedy.py's Stepper over the graphs: the logits and the K/V cache stay in the runner's arrays; only
    the B chosen ids cross to the host."""

    def __init__(self, pipeline: EnginePipeline, state: EngineState):
        self.pipeline = pipeline
        self.state: EngineState | None = state

    def argmax(self) -> np.ndarray:
        return self.pipeline.to_host(self.pipeline.arrays.argmax(self.state.logits, -1))

    def advance(self, tokens: np.ndarray) -> None:
        self.pipeline.decode_step(tokens, self.state)

    def keep(self, positions: list[int]) -> None:
        if not positions:
            self.state = None  # frees the cache now, not when the caller drops this object
            return
        s = self.state
        s.past = [p[positions] for p in s.past]
        s.valid = [v[positions] for v in s.valid]
        s.next_positions = s.next_positions[:, positions]
        s.logits = s.logits[positions]
