"""Can the embedded LLM find a visual row by its grid position? The digit_at question without the vision tower.

    python tools/localisation_probe.py --backbone qwen2.5-vl --steps 1500

The embedded model's LLM, freshly initialised as halfv_export/training starts it, gets the real prompts of digit_at
questions (the adapter's host_inputs: chat template, placeholder expansion, (M-)RoPE positions) with synthetic
visual rows in place of the tower's output: a fixed random vector per digit and one for "empty", plus noise, laid
out as the task lays digits out (2-6 filled cells of the grid, digits from 1-4 classes, each digit on one random
token of the tokens its cell covers). Only the LLM trains. Every `--eval-every` steps it prints the first answer
token's accuracy on fresh questions beside what guessing the image's most frequent digit would score.

Why: trained end to end, the embedded models stall at that guess on questions about places
(docs/accuracy/training-log.md). If this probe learns digit_at, the LLM can localise and the stall is on the
vision side or in the joint training; if it stalls here too, the LLM cannot single out a row by position.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from halfv_export.tasks.digits import CELL, PROMPTS, _cells, _question, digits_of, grid_shape, scan_indices  # noqa: E402
from halfv_export.graphs import get_adapter  # noqa: E402
from halfv_export.graphs.adapter import Processing  # noqa: E402
from halfv_export.training.train import (QuestionProbe, answer_batch, answer_prefix, learning_rate, load_with,  # noqa: E402
                            parse_size, reinitialise, teacher_forced_loss, token_centres)


def cell_tokens(adapter, loaded, size) -> dict[tuple[int, int], list[int]]:
    """(row, column) of the grid -> the visual rows whose centre lies in that cell."""
    centres = token_centres(adapter, loaded, size)
    rows, cols = grid_shape(size)
    out: dict = {}
    for k, (y, x) in enumerate(centres.tolist()):
        if y == y:  # not NaN: an image patch
            out.setdefault((min(int(y // CELL), rows - 1), min(int(x // CELL), cols - 1)), []).append(k)
    return out


def dense_grid(rows: int, cols: int, fill: float, rng: np.random.Generator) -> list[list[int | None]]:
    """Each cell holds a digit (uniform over 0-9) with probability `fill`: guessing from what is present scores
    little here, so only looking at the asked cell pays."""
    return [[int(rng.integers(10)) if rng.random() < fill else None for _ in range(cols)] for _ in range(rows)]


def draw(batch: int, size, cells: dict, prompt_row: dict, n_visual: int, table: torch.Tensor, noise: float,
         rng: np.random.Generator, g: torch.Generator, fill: float = 0.0, where: torch.Tensor | None = None,
         spread: int = 1):
    """Synthetic visual rows [B, N, D], the host row of each sample's question, answers, and the guess's hits.
    Grids and questions come from the task's own generator (tasks._cells, _question), so the digits drawn and the
    cells asked about are distributed exactly as in training; `fill` > 0 draws dense_grid instead. A digit is
    written on `spread` distinct random rows of its cell (all of them when the cell has fewer)."""
    rows, cols = grid_shape(size)
    pool = scan_indices("train")
    feats = table[10].expand(batch, n_visual, -1).clone()
    asked, answers, guess_hits = [], [], []
    for b in range(batch):
        grid = dense_grid(rows, cols, fill, rng) if fill > 0 else digits_of(_cells(rng, pool, rows, cols))
        if not any(d is not None for line in grid for d in line):
            grid[0][0] = int(rng.integers(10))
        prompt, answer = _question("digit_at", grid, rng)
        present = [d for line in grid for d in line if d is not None]
        for (r, c), tokens in cells.items():
            if grid[r][c] is not None:
                if spread == 1:  # the draw of the runs logged before --spread existed, so they replay exactly
                    chosen = [int(rng.integers(len(tokens)))]
                else:
                    chosen = rng.choice(len(tokens), size=min(spread, len(tokens)), replace=False)
                feats[b, [tokens[i] for i in chosen]] = table[grid[r][c]]
        asked.append(prompt_row[prompt])
        answers.append(answer)
        guess = max(sorted(set(present)), key=present.count)  # the most frequent digit, ties to the smallest
        guess_hits.append(answer == str(guess))
    if where is not None:  # diagnostic: every row also carries its cell's vector
        feats = feats + where
    return feats + noise * torch.randn(feats.shape, generator=g), asked, answers, guess_hits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="qwen2.5-vl")
    parser.add_argument("--image-size", default="224x224")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense", type=float, default=0.0, metavar="FILL",
                        help="train on dense grids (each cell filled with probability FILL, digits 0-9) for the "
                             "first --dense-steps steps; evaluation always uses the task's grids")
    parser.add_argument("--dense-steps", type=int, default=None, help="default: all steps")
    parser.add_argument("--position-content", action="store_true",
                        help="diagnostic: add a fixed random vector per grid cell to the cell's rows, so that the "
                             "LLM can match positions by content instead of deriving them from (M-)RoPE")
    parser.add_argument("--query-aux", type=int, default=None, metavar="LAYER",
                        help="halfv_export.training's QuestionProbe loss: the last prompt row after LLM layer LAYER must "
                             "name the asked row and column")
    parser.add_argument("--spread", type=int, default=1, metavar="K",
                        help="write each digit on K rows of its cell instead of one (a digit over K patches: "
                             "LLaVA's 14-px patches put 16 rows in a cell, Qwen's merged tokens 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a text_config entry of the shipped config, e.g. num_attention_heads=8 or "
                             "rope_parameters.rope_theta=10 (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    size = parse_size(args.image_size)
    adapter = get_adapter(args.backbone)
    loaded = load_with(adapter, args.set, args.seed)
    reinitialise(loaded.model, 0.02, args.seed)
    stack = adapter.text_stack(loaded)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    cells = cell_tokens(adapter, loaded, size)
    keys = sorted(cells)
    prompts = [PROMPTS["digit_at"].format(row=r + 1, col=c + 1) for r, c in keys]
    blank = Image.new("RGB", (size[1], size[0]), "white")
    host = adapter.host_inputs(processing, [blank] * len(keys), prompts)  # one row per cell
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    prompt_row = {prompt: i for i, prompt in enumerate(prompts)}
    table = torch.randn(11, loaded.config.text_config.hidden_size, generator=g)
    prefix, eos = answer_prefix(adapter, processing), loaded.tokenizer.eos_token_id
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else eos

    where = None
    if args.position_content:
        cell_vectors = torch.randn(len(keys), table.shape[1], generator=g)
        where = torch.zeros(host.num_visual, table.shape[1])
        for i, key in enumerate(keys):
            where[cells[key]] = cell_vectors[i]
    dense_steps = args.steps if args.dense_steps is None else args.dense_steps

    def batch_of(n: int, fill: float = 0.0):
        feats, asked, answers, guess = draw(n, size, cells, prompt_row, host.num_visual, table, args.noise, rng, g,
                                            fill, where, args.spread)
        idx = torch.tensor(asked)
        sub = dataclasses.replace(host, input_ids=host.input_ids[idx], attention_mask=host.attention_mask[idx],
                                  positions=host.positions[:, idx], visual_start=host.visual_start[idx],
                                  next_positions=host.next_positions[:, idx], pixel_values=[])
        answer, valid = answer_batch(processing, [SimpleNamespace(answer=a) for a in answers], prefix, eos, pad)
        return sub, answer, valid, feats, guess, idx

    llm = [p for n, p in loaded.model.named_parameters() if "language_model" in n or "lm_head" in n]
    llm_parameters = sum(p.numel() for p in llm)
    gather = None
    if args.query_aux is not None:
        gather = QuestionProbe(stack, args.query_aux, loaded.config.text_config.hidden_size, *grid_shape(size))
        llm += list(gather.parameters())
        asked_cell = torch.tensor([[r, c, -100] for r, c in keys])  # prompt row -> question_targets' fields
    optimizer = torch.optim.AdamW(llm, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    print(f"{args.backbone} {size}: {len(keys)} cells, {host.num_visual} visual rows, "
          f"{llm_parameters / 1e6:.2f} M LLM parameters", flush=True)
    started = time.perf_counter()
    for step in range(args.steps):
        loaded.model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, 50)
        sub, answer, valid, feats, _, asked = batch_of(args.batch, args.dense if step < dense_steps else 0.0)
        loss, _ = teacher_forced_loss(adapter, loaded, stack, sub, answer, valid, feats=feats)
        if gather is not None:
            loss = loss + gather.loss(sub.input_ids.shape[1], asked_cell[asked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm, 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            loaded.model.eval()
            with torch.no_grad():
                sub, answer, valid, feats, guess, _ = batch_of(512)
                _, first = first_token_accuracy(adapter, loaded, stack, sub, answer, valid, feats)
                dense = ""
                if args.dense > 0:  # the training grids too: does it localise where guessing cannot help?
                    sub, answer, valid, feats, dense_guess, _ = batch_of(512, args.dense)
                    _, on_dense = first_token_accuracy(adapter, loaded, stack, sub, answer, valid, feats)
                    dense = f"  dense grids {on_dense:.3f} (guess {sum(dense_guess) / len(dense_guess):.3f})"
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  first answer token accuracy {first:.3f}  "
                  f"(guessing the most frequent digit: {sum(guess) / len(guess):.3f}){dense}  "
                  f"{time.perf_counter() - started:6.0f}s", flush=True)


def first_token_accuracy(adapter, loaded, stack, host, answer, valid, feats) -> tuple[torch.Tensor, float]:
    """(loss, accuracy of the first answer token) of a batch, teacher-forced: the digit, or the first token of
    "none"."""
    only_first = valid.clone()
    only_first[:, 1:] = 0
    return teacher_forced_loss(adapter, loaded, stack, host, answer, only_first, feats=feats)


if __name__ == "__main__":
    main()
