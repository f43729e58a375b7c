"""Train an embedded default end to end on the digit task (halfv_export/tasks: digit grids or pages) and ship it.

    nice -n 15 python -m halfv_export.training --backbone qwen2.5-vl --out halfv_export/graphs/embedded/qwen2_5_vl
    python -m halfv_export.training --backbone llava-1.5 --slot 14 --device cuda --workers 4 --batch 32 ...

The whole VLM (vision tower, projector, language model) starts from the seeded random weights of the shipped config
and is trained with AdamW on teacher-forced answers: the prompt is built exactly as at inference (the adapter's
host_inputs: chat template, image placeholder expansion, left padding, (M-)RoPE positions), the answer tokens and
EOS are appended at the next positions, and the loss is the cross-entropy of the answer tokens only. The layers
run with the same additive mask and rotary tables as the eager reference (graphs/halfv.py), so training and
inference compute the same function.

Every step draws a fresh batch of training-split scans (one image-size bucket per step, buckets in turn); the
held-out score is greedy generation through HalfVReference (unpruned) on evaluation-split scans, exact match after
normalisation. The weights are written as fp16 safetensors (model.safetensors) with training.json beside them:
command, seed, steps, samples seen, wall time, threads, image sizes and the held-out accuracy per question type.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from ..tasks.digits import (DEFAULT_MIX, MAX_DIGITS, MIN_DIGITS, PROMPTS, grid_shape,
                                     normalise_answer, parse_mix, task_set)
from ..base.atomic import write_text_atomic
from ..graphs import get_adapter
from ..graphs.adapter import EMBEDDED_WEIGHTS, TRAINING_RECORD, Processing
from ..graphs.halfv import HalfVReference, additive_mask
from ..graphs.pruning import gather_rows
from .grow import GROWABLE, grow

CHECKPOINT_DIR = "checkpoint"  # under --out: the weights at the latest mid-run held-out score
EVAL_SEED = 12345  # the held-out set of the training log (validate's evaluation set is written by make-task)


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def answer_prefix(adapter, processing: Processing) -> str:
    """' ' when the generation prompt does not end in whitespace (LLaVA's 'ASSISTANT:'), '' otherwise (Qwen)."""
    text = processing.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                                                    tokenize=False, add_generation_prompt=True)
    return "" if text[-1:].isspace() else " "


def answer_ids(tokenizer, answers: list[str], prefix: str, eos: int) -> list[list[int]]:
    return [tokenizer.encode(prefix + a, add_special_tokens=False) + [eos] for a in answers]


def answer_batch(processing, samples, prefix: str, eos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer tokens (+ EOS) of a batch, right-padded: ids [B, A] and a 0/1 validity mask [B, A]."""
    targets = answer_ids(processing.tokenizer, [s.answer for s in samples], prefix, eos)
    b, a = len(samples), max(len(t) for t in targets)
    answer = torch.full((b, a), pad, dtype=torch.long)
    answer_valid = torch.zeros((b, a), dtype=torch.long)
    for i, t in enumerate(targets):
        answer[i, :len(t)] = torch.tensor(t)
        answer_valid[i, :len(t)] = 1
    return answer, answer_valid


def on_device(host, device):
    """HostInputs with every tensor moved to `device` (the host side always builds them on the CPU)."""
    move = {k: getattr(host, k).to(device) for k in ("input_ids", "attention_mask", "positions", "visual_start",
                                                        "next_positions")}
    return dataclasses.replace(host, pixel_values=[p.to(device) for p in host.pixel_values], **move)


def teacher_forced_loss(adapter, loaded, stack, host, answer, answer_valid,
                        feats: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the answer tokens (and EOS) given image + prompt; also the share of answer tokens whose
    argmax is right (a cheap training-accuracy signal). Every tensor is on the model's device. `feats` [B, N, D]
    stands in for the vision tower's output (tools/localisation_probe.py)."""
    b, s, a = host.input_ids.shape[0], host.input_ids.shape[1], answer.shape[1]
    ids = torch.cat([host.input_ids, answer], dim=1)  # [B, S + A]
    valid = torch.cat([host.attention_mask, answer_valid], dim=1)
    steps = torch.arange(a, device=ids.device)[None, None, :]  # answer j sits at next_position + j
    positions = torch.cat([host.positions, host.next_positions[..., None] + steps], dim=2)  # [P, B, S + A]

    embeds = stack.embed_tokens(ids)  # [B, S + A, D]
    if host.num_visual > 0:
        if feats is None:
            feats = adapter.vision_batch(loaded, host.pixel_values, host.bucket)  # [B, N, D]
        rows = host.visual_start[:, None] + torch.arange(host.num_visual, device=ids.device)[None, :]
        embeds = embeds.scatter(1, rows[..., None].expand(-1, -1, embeds.shape[-1]), feats.to(embeds.dtype))
    cos, sin = stack.rotary(embeds, positions)
    mask = additive_mask(valid, ids.shape[1], embeds.dtype)
    h = embeds
    for layer in stack.layers:
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
    # the row before each answer token predicts it: rows S-1 .. S+A-2
    pred_rows = (s - 1 + torch.arange(a, device=ids.device))[None, :].expand(b, -1)
    logits = stack.lm_head(stack.norm(gather_rows(h, pred_rows)))  # [B, A, V]
    keep = answer_valid.bool()
    loss = F.cross_entropy(logits[keep].float(), answer[keep])
    token_acc = float((logits[keep].argmax(-1) == answer[keep]).float().mean())
    return loss, token_acc


# ------------------------------------------------------------------------------------------- question gathering
QUESTION_FIELDS = ("row", "col", "digit")
_PROMPT_PATTERNS = {kind: re.compile(re.escape(text).replace(r"\{row\}", r"(?P<row>\d+)")
                                     .replace(r"\{col\}", r"(?P<col>\d+)").replace(r"\{digit\}", r"(?P<digit>\d)") + "$")
                    for kind, text in PROMPTS.items()}


def question_targets(samples) -> torch.Tensor:
    """[B, 3]: what each prompt names, (row - 1, column - 1, digit), -100 where it names none (count_all names
    nothing, row_digits only a row)."""
    out = torch.full((len(samples), len(QUESTION_FIELDS)), -100, dtype=torch.long)
    for i, sample in enumerate(samples):
        named = _PROMPT_PATTERNS[sample.type].match(sample.prompt).groupdict()
        for j, key in enumerate(QUESTION_FIELDS):
            if key in named:
                out[i, j] = int(named[key]) - (key != "digit")
    return out


class QuestionProbe(torch.nn.Module):
    """Auxiliary heads that make the LLM gather the question into the row that answers it.

    Asked "What is the digit in row 2, column 3?", the answer's first token is predicted by the prompt's last row,
    which must first collect "2" and "3" from ten and five tokens back, then look up that cell among the visual rows.
    Learnt only through the answer, the two hops wait on each other and sat at the guess for thousands of steps;
    with this loss (linear heads on that row after `layer` must name the asked row, column and digit) the lookup
    was learnt in a few hundred (tools/localisation_probe.py, docs/accuracy/training-log.md). The heads are
    discarded; the shipped model is the transformers architecture, unchanged."""

    def __init__(self, stack, layer: int, dim: int, rows: int, cols: int):
        super().__init__()
        if not 0 <= layer < len(stack.layers):
            raise SystemExit(f"--question-aux {layer}: the LLM has layers 0..{len(stack.layers) - 1}; pick one of "
                             "them (2 worked on the embedded models)")
        self.heads = torch.nn.ModuleList([torch.nn.Linear(dim, rows), torch.nn.Linear(dim, cols),
                                          torch.nn.Linear(dim, 10)])
        self.hidden: torch.Tensor | None = None
        stack.layers[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, prompt_length: int, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each field the prompts name, from the last prompt row of the latest forward."""
        last = F.rms_norm(self.hidden[:, prompt_length - 1], (self.hidden.shape[-1],))
        total = last.new_zeros(())
        for head, target in zip(self.heads, targets.to(last.device).unbind(1)):
            if bool((target >= 0).any()):
                total = total + F.cross_entropy(head(last), target, ignore_index=-100)
        return total


# ------------------------------------------------------------------------------------------- batches
# Drawing a batch (PIL images, the processor, tokenising) costs more CPU than a GPU step of these small models, so
# batches are made ahead in forked worker processes. What the makers need is put here before the pool forks.
_MAKER: dict = {}


def make_answer_batch(step: int):
    """Stage 2's batch of `step`: (HostInputs, answer ids, answer mask, question_targets, the digit drawn over each
    visual token or None), all on the CPU."""
    m = _MAKER
    size = m["sizes"][step % len(m["sizes"])]
    phase_mix, digits = m["phase_of"](step)
    samples = task_set(m["batch"], seed=m["seed"] * 1_000_003 + step, split="train", sizes=[size], mix=phase_mix,
                       digits=digits, slot=m["slot"], task=m.get("task", "grid"), augment=m.get("augment", False))
    host = m["adapter"].host_inputs(m["processing"], [x.image for x in samples], [x.prompt for x in samples])
    drawn = token_targets(samples, m["centres"][size]) if "centres" in m else None
    return (host, *answer_batch(m["processing"], samples, m["prefix"], m["eos"], m["pad"]), question_targets(samples),
            drawn)


def prefetched(make, steps: range, workers: int):
    """make(step) for every step, in order, computed `workers` processes ahead (0: inline)."""
    if workers <= 0:
        yield from (make(step) for step in steps)
        return
    # one intra-op thread in each worker: a forked child that enters the OpenMP pool its parent started hangs
    with multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        todo, pending = iter(steps), collections.deque()
        for step in itertools.islice(todo, 2 * workers):
            pending.append(pool.apply_async(make, (step,)))
        while pending:
            result = pending.popleft().get()
            step = next(todo, None)
            if step is not None:
                pending.append(pool.apply_async(make, (step,)))
            yield result


@torch.no_grad()
def held_out_accuracy(adapter, loaded, stack, samples, batch: int = 16) -> dict:
    """Greedy answers of the unpruned eager model (the inference path) vs the references, per question type."""
    reference = HalfVReference(stack, None)
    eos = adapter.eos_token_ids(loaded)
    per_type: dict[str, list[bool]] = {}
    groups: dict = {}
    for sample in samples:
        groups.setdefault(sample.image.size, []).append(sample)
    for group in groups.values():
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            inputs = adapter.prepare(loaded, [s.image for s in chunk], [s.prompt for s in chunk])
            longest = max(len(loaded.tokenizer.encode(" " + s.answer, add_special_tokens=False)) for s in chunk)
            tokens = reference.generate(inputs, longest + 2, eos)
            for s, row in zip(chunk, tokens.tolist()):
                text = adapter.decode_text(loaded, row)
                per_type.setdefault(s.type, []).append(normalise_answer(text) == normalise_answer(s.answer))
    everything = [x for v in per_type.values() for x in v]
    return {"accuracy": sum(everything) / len(everything), "count": len(everything),
            "per_type": {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(per_type.items())}}


def held_out_on_cpu(adapter, loaded, stack, samples, device: torch.device) -> dict:
    """held_out_accuracy on the CPU, the machine the shipped weights are evaluated on, then back to `device`."""
    loaded.model.to("cpu")
    try:
        return held_out_accuracy(adapter, loaded, stack, samples)
    finally:
        loaded.model.to(device)


def edited_config(adapter, overrides: list[str]) -> dict:
    """The shipped config.json with text_config entries replaced: KEY=JSON, dots reaching into dicts
    (rope_parameters.rope_theta=10). What --set trains, and what is written beside the weights it produces."""
    config = json.loads((adapter.embedded_dir / "config.json").read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        *path, last = key.split(".")
        target = config["text_config"]
        try:
            for part in path:
                target = target[part]
            target[last]  # an existing entry: a misspelt key must not train a silently unchanged model
            target[last] = json.loads(value)
        except (KeyError, TypeError, json.JSONDecodeError):
            raise SystemExit(f"--set {item!r}: write KEY=JSON for an existing text_config entry, e.g. "
                             "rope_parameters.rope_theta=10") from None
    return config


def load_with(adapter, overrides: list[str], seed: int):
    """The embedded model with weights drawn from `seed`, its config edited by `overrides` (edited_config)."""
    from ..graphs.adapter import LoadedModel
    from ..graphs.checkpoint import seeded_model

    if not overrides:
        return adapter.load(None, seed=seed)
    model = seeded_model(adapter.model_class, adapter.config_class.from_dict(edited_config(adapter, overrides)), seed)
    proc = adapter.load_processing(adapter.embedded_dir, config=model.config)
    return LoadedModel(model=model, tokenizer=proc.tokenizer, image_processor=proc.image_processor,
                       source=f"embedded:{adapter.name}:seed={seed}+{','.join(overrides)}")


def load_init(adapter, loaded, weights: Path, overrides: list[str] = ()) -> None:
    """Weights this script saved (model.safetensors: save_pretrained's names, which are not the module's) into the
    model, through from_pretrained on a temporary checkpoint of the shipped config so the names map as transformers
    maps them. A plain load_state_dict matched none of them and trained from the random init instead."""
    from ..graphs.checkpoint import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(edited_config(adapter, list(overrides))))
        os.symlink(Path(weights).resolve(), Path(tmp) / EMBEDDED_WEIGHTS)
        trained = load_pretrained(adapter.model_class, Path(tmp))
    loaded.model.load_state_dict(trained.state_dict(), strict=True)


def init_shape(weights: Path) -> list[str]:
    """--set entries for the language model's depth and MLP width that `weights` were saved at (read off the tensor
    names and shapes), so --grow starts from what the file holds, not from the shipped config."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        gates = {int(m.group(1)): n for n in f.keys() if (m := re.search(r"layers\.(\d+)\.mlp\.gate_proj\.weight$", n))}
        layers, width = max(gates) + 1, f.get_slice(gates[0]).get_shape()[0]  # the LM's (CLIP's MLPs are fc1 / fc2)
    return [f"num_hidden_layers={layers}", f"intermediate_size={width}"]


def init_history(weights: Path | None) -> list[dict]:
    """The runs that made the --init weights, oldest first, from the training.json beside them (empty when there is
    none): a continued model ships with every command it took, so the README can say how to rebuild it."""
    record = weights.parent / TRAINING_RECORD if weights is not None else None
    if record is None:
        return []
    if not record.is_file():
        # a copied model.safetensors alone loses the commands that made it; main() reads this before training
        print(f"warning: no {TRAINING_RECORD} beside {weights}: this run's init_history will be empty; copy the "
              f"record next to the weights to keep it", flush=True)
        return []
    earlier = json.loads(record.read_text())
    keep = ("command", "sha256", "steps", "steps_run", "batch", "lr", "images_seen", "train_seconds", "threads",
            "machine", "device", "held_out")
    run = {k: earlier[k] for k in keep if k in earlier}
    if "held_out" in run:
        run["held_out"] = {k: run["held_out"][k] for k in ("accuracy", "count") if k in run["held_out"]}
    return earlier.get("init_history", []) + [run]


def reinitialise(model, std: float, seed: int) -> None:
    """Seeded fresh weights: norm layers weight 1 / bias 0, every other bias 0, every other parameter (Linear, Conv,
    Embedding, CLIP's class embedding, LLaVA-NeXT's image newline) from N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


# ------------------------------------------------------------------------------------------- stage 1: vision
def token_centres(adapter, loaded, bucket: tuple[int, int]) -> torch.Tensor:
    """[N, 2] pixel centre (y, x) in the bucket image of every visual token, in the order the LLM sees them;
    NaN for rows that are not image patches (LLaVA-NeXT's image-newline rows)."""
    h, w = bucket
    cfg = loaded.config
    boxes = adapter.token_boxes(Processing(loaded.tokenizer, loaded.image_processor, cfg), bucket)
    if boxes is not None:  # one box of the image per visual row (a merged Qwen token; a CLIP patch of the crop)
        return torch.tensor([((top + bottom) / 2, (left + right) / 2) for top, left, bottom, right in boxes])
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    # LLaVA-NeXT: base tile (the whole image at tile size) first, then the pinpoint's tiles row-major, unpadded
    # (nothing to unpad: the image is its pinpoint) with a newline row after each feature row.
    layout = adapter.layout(cfg, bucket)
    tokens, tile = side * side, cfg.vision_config.image_size
    npw, nph = w // tile, h // tile
    tiles = 1 + nph * npw
    out = torch.full((layout.numel(), 2), float("nan"))
    for row, code in enumerate(layout.tolist()):
        if code == tiles * tokens:
            continue
        t, (i, j) = code // tokens, divmod(code % tokens, side)
        if t == 0:
            out[row] = torch.tensor([(i + 0.5) * h / side, (j + 0.5) * w / side])
        else:
            tr, tc = divmod(t - 1, npw)
            out[row] = torch.tensor([(tr * side + i + 0.5) * h / (nph * side), (tc * side + j + 0.5) * w / (npw * side)])
    return out


def token_targets(samples, centres: torch.Tensor) -> torch.Tensor:
    """[B, N]: the digit drawn over each visual token (its centre inside the digit's box, or the token nearest the
    box centre when no centre is inside), 10 elsewhere; -100 (ignored) for non-patch rows. `centres`: token_centres
    of the samples' bucket."""
    c = centres
    targets = torch.full((len(samples), c.shape[0]), 10, dtype=torch.long)
    targets[:, torch.isnan(c[:, 0])] = -100
    for b, sample in enumerate(samples):
        for r, col, top, left, side in sample.boxes:
            inside = ((c[:, 0] >= top) & (c[:, 0] < top + side) & (c[:, 1] >= left) & (c[:, 1] < left + side))
            if not bool(inside.any()):
                centre = torch.tensor([top + side / 2, left + side / 2])
                inside = torch.zeros_like(inside)
                inside[(c - centre).norm(dim=1).nan_to_num(1e9).argmin()] = True
            targets[b, inside] = sample.grid[r][col]
    return targets


class DigitProbe(torch.nn.Module):
    """A linear head that must name the digit drawn over each visual token (or "empty"), reading the tower's output
    RMS-normalised as the LLM's first norm sees it. Stage 1 trains the tower with it alone; stage 2 can add it to
    the answer loss (--digit-aux), so that every digit on every page teaches the tower, not only the few an answer
    names. Discarded after training."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim, self.head = dim, torch.nn.Linear(dim, 11)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(F.rms_norm(feats, (self.dim,)))  # [B, N, 11]

    @staticmethod
    def digit_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Whether each token with a digit drawn over it (targets 0..9) is named right: bool [T]."""
        digit = targets.ge(0) & targets.lt(10)
        return logits.argmax(-1)[digit] == targets[digit]


def balanced_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over digit tokens plus mean over empty tokens. A plain mean is ~98% empty tokens at 256
    CLIP patches per image: it is minimised by answering "empty" everywhere, and LLaVA's tower learnt nothing."""
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                reduction="none")
    flat = targets.reshape(-1)
    digit, empty = flat.lt(10) & flat.ge(0), flat.eq(10)
    return per_token[digit].mean() + per_token[empty].mean()


def pretrain_vision(adapter, loaded, processing, sizes, steps: int, batch: int, lr: float, seed: int,
                    slot: int, device: torch.device, task: str = "grid", augment: bool = False) -> dict:
    """Stage 1: the vision tower and projector learn to tell the digits apart. A temporary linear head reads every
    visual token on its own, RMS-normalised as the LLM's first norm sees it, and must name the digit drawn over it
    (or "empty"). The head is discarded; the VLM keeps the tower."""
    head = DigitProbe(loaded.config.text_config.hidden_size).to(device)
    vision = [p for n, p in loaded.model.named_parameters() if "language_model" not in n and "lm_head" not in n]
    optimizer = torch.optim.AdamW([{"params": vision}, {"params": head.parameters()}], lr=lr, weight_decay=0.01)
    centres = {size: token_centres(adapter, loaded, size) for size in sizes}

    def token_logits(samples, size):
        host = on_device(adapter.host_inputs(processing, [s.image for s in samples], ["x"] * len(samples)), device)
        return head(adapter.vision_batch(loaded, host.pixel_values, host.bucket))  # [B, N, 11]

    started, running = time.perf_counter(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, max(1, steps // 20))
        size = sizes[step % len(sizes)]
        samples = task_set(batch, seed=seed * 7_000_003 + step, split="train", sizes=[size], slot=slot, task=task,
                           augment=augment)
        logits, targets = token_logits(samples, size), token_targets(samples, centres[size]).to(device)
        loss = balanced_token_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision + list(head.parameters()), 1.0)
        optimizer.step()
        running.append((loss.item(), float(DigitProbe.digit_hits(logits, targets).float().mean())))
        if (step + 1) % 20 == 0:
            l, a = (sum(x) / len(running) for x in zip(*running))
            print(f"vision {step + 1:5d}  loss {l:.4f}  digit-token acc {a:.3f}  "
                  f"{time.perf_counter() - started:7.1f}s", flush=True)
            running = []
    hits = []
    with torch.no_grad():
        for size in sizes:
            held = task_set(32, seed=EVAL_SEED + 1, split="eval", sizes=[size], slot=slot, task=task)
            logits, targets = token_logits(held, size), token_targets(held, centres[size]).to(device)
            hits += DigitProbe.digit_hits(logits, targets).tolist()
    result = {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.perf_counter() - started, 1),
              "held_out_digit_token_accuracy": sum(hits) / len(hits)}
    print(f"vision stage: held-out accuracy of digit tokens {result['held_out_digit_token_accuracy']:.3f} "
          f"({result['seconds']:.0f}s)", flush=True)
    return result


# ------------------------------------------------------------------------------------------- stage 2: the VLM
def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def machine(device: torch.device) -> str:
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return f"{torch.cuda.get_device_name(device)}, {cpu}" if device.type == "cuda" else cpu


def save_fp16(model, directory: Path) -> Path:
    """The model's weights as fp16 safetensors (save_pretrained, so the names are what from_pretrained expects)."""
    with tempfile.TemporaryDirectory() as tmp:
        half = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=half, safe_serialization=True)
        produced = Path(tmp) / EMBEDDED_WEIGHTS
        if not produced.exists():
            raise SystemExit(f"save_pretrained wrote {sorted(p.name for p in Path(tmp).iterdir())}, "
                             f"not {EMBEDDED_WEIGHTS}")
        Path(directory).mkdir(parents=True, exist_ok=True)
        target = Path(directory) / EMBEDDED_WEIGHTS
        shutil.copyfile(produced, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m halfv_export.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--out", type=Path, help="Where model.safetensors + training.json go (default: only report).")
    parser.add_argument("--image-size", action="append", default=None, help="HxW, repeatable (default 224x224).")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="Initial weights and training data.")
    parser.add_argument("--mix", default=None, help="Question mix, e.g. digit_at=3,read_all=2 (default: the task's).")
    parser.add_argument("--eval-mix", default=None,
                        help="Question mix of the held-out questions (default: --mix), e.g. the task's own mix "
                             "when --mix weights training towards the weakest types.")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=200)
    # One intra-op thread: on a shared, oversubscribed CPU two OpenMP threads spin-wait for each other and ran these
    # small matrices >10x slower than one (measured on the 2-core box while other jobs ran).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="Where the training steps run: cpu, or cuda where a GPU is "
                        "(batches are still drawn on the CPU; held-out scores are always computed on the CPU).")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="Stop stage 2 after this many seconds (0: run every step); the steps run are recorded.")
    parser.add_argument("--workers", type=int, default=0,
                        help="Processes drawing stage 2 batches ahead of the training steps (0: inline).")
    parser.add_argument("--init", type=Path, help="Continue from these safetensors instead of the seeded init.")
    parser.add_argument("--grow", action="store_true",
                        help="The --init weights are of the config without the --set num_hidden_layers / "
                             "intermediate_size entries: grow them to it without changing the function (new layers "
                             "copy the one before with zeroed output projections; new MLP units add nothing).")
    parser.add_argument("--init-std", type=float, default=0.02,
                        help="Re-draw every weight matrix from N(0, std) before training (norms 1, biases 0); "
                             "the shipped configs' 0.08 is for the seeded random defaults. 0: keep the seeded init.")
    parser.add_argument("--stage1-out", type=Path, help="Save the weights after stage 1 here (fp32 safetensors).")
    parser.add_argument("--first-steps", type=int, default=250,
                        help="Curriculum phase A: one digit per image, read_all questions only (the LLM learns to "
                             "find and copy a digit token; mixed questions from scratch sit on a loss plateau).")
    parser.add_argument("--warm-steps", type=int, default=500,
                        help="Curriculum phase B: --warm-mix questions on 1-3 digits.")
    parser.add_argument("--warm-mix", default=None, help="Question mix of phase B (default: --mix).")
    parser.add_argument("--warm-digits", default="1-3", help="Filled cells per image in phase B, e.g. 1-3.")
    parser.add_argument("--freeze-vision-steps", type=int, default=0,
                        help="Stage 2 steps with the vision tower and projector frozen (the LLM learns to read them "
                             "before their gradients are trusted).")
    parser.add_argument("--vision-lr-scale", type=float, default=0.25,
                        help="Stage 2 learning rate of the vision tower and projector, relative to --lr.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="Train a config with this text_config entry changed, e.g. rope_parameters.rope_theta=10 "
                             "(repeatable); --out then gets the edited config.json beside the weights.")
    parser.add_argument("--question-aux", type=int, default=None, metavar="LAYER",
                        help="Stage 2 auxiliary loss: the last prompt row after LLM layer LAYER must name the row, "
                             "column and digit the question asks about (QuestionProbe; discarded after training).")
    parser.add_argument("--task", choices=("grid", "page"), default="grid",
                        help="grid: the digit grid covers the image; page: a small block of digits on a large page.")
    parser.add_argument("--augment", action="store_true",
                        help="Distort each training scan as it is drawn (rotation, shear, stroke weight); held-out "
                             "questions are drawn without it.")
    parser.add_argument("--digit-aux", type=float, default=0.0, metavar="WEIGHT",
                        help="Stage 2 auxiliary loss, times WEIGHT: a linear head on the tower's output must name "
                             "the digit drawn over every visual token (DigitProbe; discarded after training).")
    parser.add_argument("--slot", type=int, default=28, help="Digit slot in pixels (28: a merged token of a windowed tower; "
                        "14: a CLIP patch); recorded in training.json, used by make-task --backbone.")
    parser.add_argument("--vision-steps", type=int, default=300, help="Stage 1 steps (0: skip).")
    parser.add_argument("--vision-batch", type=int, default=16)
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = [parse_size(s) for s in (args.image_size or ["224x224"])]
    mix = parse_mix(args.mix)
    warm_digits = tuple(int(x) for x in args.warm_digits.split("-"))
    phases = [(args.first_steps, {"read_all": 1.0}, (1, 1)),
              (args.warm_steps, parse_mix(args.warm_mix) if args.warm_mix else mix, warm_digits),
              (max(0, args.steps - args.first_steps - args.warm_steps), mix, (MIN_DIGITS, MAX_DIGITS))]

    def phase_of(step: int) -> tuple[dict, tuple[int, int]]:
        for length, phase_mix, digits in phases:
            if step < length:
                return phase_mix, digits
            step -= length
        return mix, (MIN_DIGITS, MAX_DIGITS)
    if args.task == "page" and args.question_aux is not None:
        parser.error("--question-aux reads grid cells at fixed image positions; a page block moves: drop it for --task page")
    command = "python -m halfv_export.training " + " ".join(sys.argv[1:] if argv is None else argv)
    adapter = get_adapter(args.backbone)
    loaded = load_with(adapter, args.set, args.seed)  # the shipped config (edited by --set), seeded random weights
    if args.init is not None and args.grow:
        grown = [s for s in args.set if s.partition("=")[0] in GROWABLE]
        if not grown:
            parser.error(f"--grow needs --set for one of {', '.join(GROWABLE)}, e.g. --set num_hidden_layers=12")
        source = [s for s in args.set if s not in grown] + init_shape(args.init)  # what the --init weights hold
        small = load_with(adapter, source, args.seed)
        load_init(adapter, small, args.init, source)
        try:
            grow(small.model, loaded.model, args.seed)
        except ValueError as err:
            parser.error(f"--grow: {err}")
        print(f"init from {args.init}, grown by {' '.join(grown)}", flush=True)
    elif args.init is not None:
        load_init(adapter, loaded, args.init, args.set)
        print(f"init from {args.init}", flush=True)
    elif args.grow:
        parser.error("--grow grows the --init weights: give --init")
    earlier = init_history(args.init)  # read with the weights, so a missing record is reported before training
    model, stack = loaded.model, adapter.text_stack(loaded)
    if args.init_std > 0 and args.init is None:
        reinitialise(model, args.init_std, args.seed)
    device = torch.device(args.device)
    model.to(device)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    prefix = answer_prefix(adapter, processing)
    eos = loaded.tokenizer.eos_token_id
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else eos
    eval_mix = parse_mix(args.eval_mix) if args.eval_mix else mix
    held_out = task_set(args.eval_samples, seed=EVAL_SEED, split="eval", sizes=sizes, mix=eval_mix, slot=args.slot,
                        task=args.task)
    params = sum(p.numel() for p in model.parameters())
    overall = time.perf_counter()
    vision_stage = None
    if args.vision_steps > 0:
        model.train()
        vision_stage = pretrain_vision(adapter, loaded, processing, sizes, args.vision_steps, args.vision_batch,
                                       args.vision_lr, args.seed, args.slot, device, args.task, args.augment)
        if args.stage1_out is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(args.stage1_out))
    print(f"{args.backbone}: {params / 1e6:.2f} M parameters, sizes {sizes}, mix {mix}, "
          f"{args.steps} steps x {args.batch}", flush=True)

    groups = {}
    for n, p in model.named_parameters():
        vision = "language_model" not in n and "lm_head" not in n
        decays = p.dim() >= 2 and "embed" not in n
        groups.setdefault((vision, decays), []).append(p)
    gather = None
    if args.question_aux is not None:
        grids = [grid_shape(size) for size in sizes]
        gather = QuestionProbe(stack, args.question_aux, loaded.config.text_config.hidden_size,
                               max(r for r, _ in grids), max(c for _, c in grids)).to(device)
        groups[(False, False)] = groups.get((False, False), []) + list(gather.parameters())
    probe = None
    if args.digit_aux > 0:
        probe = DigitProbe(loaded.config.text_config.hidden_size).to(device)
        groups[(False, False)] = groups.get((False, False), []) + list(probe.parameters())
        _MAKER["centres"] = {size: token_centres(adapter, loaded, size) for size in sizes}
    optimizer = torch.optim.AdamW(
        [{"params": ps, "weight_decay": args.weight_decay if decays else 0.0, "vision": vision}
         for (vision, decays), ps in groups.items()], lr=args.lr, betas=(0.9, 0.98))
    trained = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])  # clipped as one
    _MAKER.update(adapter=adapter, processing=processing, sizes=sizes, phase_of=phase_of, batch=args.batch,
                  seed=args.seed, slot=args.slot, prefix=prefix, eos=eos, pad=pad, task=args.task,
                  augment=args.augment)
    started = time.perf_counter()
    log, running, steps_run = [], [], 0
    batches = prefetched(make_answer_batch, range(args.steps), args.workers)
    for step, (host, answer, answer_valid, asked, drawn) in enumerate(batches):
        model.train()
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            frozen = group["vision"] and step < args.freeze_vision_steps
            group["lr"] = 0.0 if frozen else lr * (args.vision_lr_scale if group["vision"] else 1.0)
        host = on_device(host, device)
        feats = adapter.vision_batch(loaded, host.pixel_values, host.bucket) if probe is not None else None
        loss, token_acc = teacher_forced_loss(adapter, loaded, stack, host, answer.to(device),
                                              answer_valid.to(device), feats)
        digit_acc = float("nan")
        if probe is not None:
            logits, drawn = probe(feats), drawn.to(device)
            loss = loss + args.digit_aux * balanced_token_loss(logits, drawn)
            digit_acc = float(DigitProbe.digit_hits(logits, drawn).float().mean())
        if gather is not None:
            loss = loss + gather.loss(host.input_ids.shape[1], asked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        running.append((loss.item(), token_acc, digit_acc))
        steps_run = step + 1
        if args.time_limit and time.perf_counter() - started > args.time_limit:
            print(f"time limit: stopping after {steps_run} of {args.steps} steps", flush=True)
            break
        if (step + 1) % 20 == 0 or step == 0:
            l, t, d = (sum(x) / len(running) for x in zip(*running))
            probed = f"digit-token acc {d:.3f}  " if probe is not None else ""
            print(f"step {step + 1:5d}  lr {lr:.2e}  loss {l:.4f}  answer-token acc {t:.3f}  {probed}"
                  f"{time.perf_counter() - started:7.1f}s", flush=True)
            log.append({"step": step + 1, "loss": round(l, 5), "token_accuracy": round(t, 4),
                        **({"digit_token_accuracy": round(d, 4)} if probe is not None else {}),
                        "seconds": round(time.perf_counter() - started, 1)})
            running = []
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            acc = held_out_on_cpu(adapter, loaded, stack, held_out[:100], device)
            print(f"  held-out (100) exact match {acc['accuracy']:.3f}  "
                  + "  ".join(f"{k} {v['accuracy']:.2f}" for k, v in acc["per_type"].items()), flush=True)
            if args.out is not None:  # a run cut off later still leaves these weights (continue with --init)
                save_fp16(model, args.out / CHECKPOINT_DIR)
                if args.set:  # as beside the final weights: a grown or edited checkpoint loads only into its config
                    write_text_atomic(args.out / CHECKPOINT_DIR / "config.json",
                                      json.dumps(edited_config(adapter, args.set), indent=2) + "\n")
                write_text_atomic(args.out / CHECKPOINT_DIR / "checkpoint.json", json.dumps(
                    {"step": step + 1, "of_steps": args.steps,
                     "held_out": {"accuracy": acc["accuracy"], "count": acc["count"]},
                     "seconds": round(time.perf_counter() - overall, 1), "command": command}) + "\n")
    train_seconds = time.perf_counter() - overall  # both stages
    images_seen = steps_run * args.batch + (args.vision_steps * args.vision_batch if vision_stage else 0)
    model.eval()
    model.to("cpu")
    with torch.no_grad():  # score what ships: the fp16 weights, on the CPU
        for t in model.parameters():
            if t.is_floating_point():
                t.copy_(t.half().float())
    acc = held_out_accuracy(adapter, loaded, stack, held_out)
    print(f"held-out exact match {acc['accuracy']:.4f} on {acc['count']} samples ("
          + ", ".join(f"{k} {v['accuracy']:.3f}/{v['count']}" for k, v in acc["per_type"].items())
          + f"); trained {train_seconds:.0f}s, {images_seen} generated images", flush=True)
    if args.out is None:
        return
    target = save_fp16(model, args.out)
    if args.set:  # the weights only load into the config they were trained with
        write_text_atomic(args.out / "config.json", json.dumps(edited_config(adapter, args.set), indent=2) + "\n")
    record = {
        "backbone": args.backbone, "weights": EMBEDDED_WEIGHTS,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(), "dtype": "float16",
        "command": command,
        "seed": args.seed, "steps": args.steps, "steps_run": steps_run, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "curriculum": [{"steps": n, "mix": m, "digits": list(d)} for n, m, d in phases],
        "config_overrides": args.set, "grown": args.grow, "question_aux_layer": args.question_aux, "freeze_vision_steps": args.freeze_vision_steps, "vision_lr_scale": args.vision_lr_scale, "augment": args.augment, "digit_aux": args.digit_aux, "images_seen": images_seen, "vision_stage": vision_stage,
        "image_sizes": [list(s) for s in sizes], "mix": mix if args.mix else DEFAULT_MIX,
        "task": {"generator": "halfv_export.tasks.digits", "split": "train", "slot": args.slot, "kind": args.task},
        "train_seconds": round(train_seconds, 1), "threads": args.threads,
        "machine": machine(device), "device": str(device), "workers": args.workers, "torch": torch.__version__,
        "held_out": {"seed": EVAL_SEED, "split": "eval", "mix": eval_mix, **acc, "model": "unpruned eager, the fp16 weights, CPU"},
        "parameters": params, "log": log,
        "init_history": earlier,
        "total_train_seconds": round(train_seconds + sum(r.get("train_seconds", 0) for r in earlier), 1),
    }
    (args.out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and {args.out / TRAINING_RECORD}", flush=True)


if __name__ == "__main__":
    main()
