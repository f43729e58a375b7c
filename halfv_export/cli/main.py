"""The `halfv-export` command line. Each command is a thin shell over a library function; user errors come out
as one line and a non-zero exit (2: bad input, 1: a stage failed), tracebacks only with --debug."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path

import click

from ..base.version import VERSION
from ..base.errors import HalfvError
from ..base.kinds import RATIO_KINDS, SSR_MODES

EPILOG_CALIBRATE = """\b
Examples:
  halfv-export calibrate --backbone qwen2.5-vl --out build/
  halfv-export calibrate --backbone qwen2.5-vl --model ./Qwen2.5-VL-3B-Instruct --data calib/ --out build/
  halfv-export calibrate --backbone qwen2.5-vl --paper-values --ssr-layer 5 --out build/
  halfv-export calibrate --backbone llava-1.5 --data evalset/ --out build-llava/
  halfv-export calibrate --backbone llava-1.5 --random-weights 0 --out build-random/
  halfv-export calibrate --backbone qwen2.5-vl --target-ratio 2 --out build/
  halfv-export calibrate --backbone qwen2.5-vl --target-ratio 3 --bucket 448x448 --ssr-mode topk --out build/
"""

EPILOG_FLOPS = """\b
Examples:
  halfv-export flops --config Qwen2.5-VL-7B/config.json --visual-tokens 4096 --text-tokens 64
  halfv-export flops --config config.json --schedule build/schedule.json --visual-tokens 576 --visual-tokens 2304
  halfv-export flops --config config.json --ivr-layer 3 --keep-ratio 0.5 --anchor-ratio 0.2 \\
      --ssr-layer 15 --ssr-mode freeze --visual-tokens 576
  halfv-export flops --config Qwen2.5-VL-7B/config.json --end-to-end --visual-tokens 576 --visual-tokens 4096
  halfv-export flops --config Qwen2.5-VL-7B/config.json --vision-cut 7:0.25 --keep-ratio 0.5 --visual-tokens 4096
"""


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# what the [export] extra adds to the runtime install (pyproject.toml): a command that imports one of these is a
# toolchain command
TOOLCHAIN = {"torch", "transformers", "safetensors", "onnx", "onnxscript", "matplotlib", "sklearn"}


def user_errors(fn):
    """HalfvError -> one line with its exit code; anything unexpected -> one line unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = (click.get_current_context().find_root().obj or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except HalfvError as e:
            if debug:
                raise
            raise CliError(str(e), e.exit_code) from None
        except (click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except ModuleNotFoundError as e:
            if debug or (e.name or "").split(".")[0] not in TOOLCHAIN:
                raise
            command = click.get_current_context().info_name
            raise CliError(f"`{command}` needs the export toolchain ({e.name} is not installed; the runtime install "
                           "only runs builds); install the [export] extra: pip install '.[export]' in a checkout", 1) \
                from None
        except Exception as e:  # noqa: BLE001 - the one place that turns surprises into a line
            if debug:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CliError(f"unexpected {e.__class__.__name__}: {first} (re-run with --debug for the traceback)", 1) \
                from None

    return wrapper


def schedule_options(fn):
    """The six schedule fields as flags; each overrides calibration or the paper default."""
    options = [
        click.option("--ivr-layer", type=int, help="L1: IVR runs before this layer (>= 1)."),
        click.option("--keep-ratio", type=float, help="rho: IVR keeps floor(N*rho) visual tokens."),
        click.option("--anchor-ratio", type=float, help="alpha: share of the kept tokens chosen by attention."),
        click.option("--ssr-layer", type=int, help="L2: SSR acts from this layer on (> L1)."),
        click.option("--ssr-mode", type=click.Choice(SSR_MODES), help="SSR: top-K prune or freeze visual rows."),
        click.option("--ssr-ratio", type=float, help="sigma (topk): keeps min(floor(N*sigma), K1) visual tokens."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def search_options(fn):
    """--target-ratio and what it is measured at (calibration/search.py)."""
    options = [
        click.option("--target-ratio", type=float, metavar="R",
                     help="Search the schedule with the best fidelity whose FLOPs ratio (unpruned / HalfV) is >= R, "
                          "instead of the calibration rules; schedule flags given hold that field fixed."),
        click.option("--ratio-kind", type=click.Choice(RATIO_KINDS), default="prefill", show_default=True,
                     help="What --target-ratio counts: the LLM prefill, or time to first token (vision tower + "
                          "prefill)."),
        click.option("--bucket", metavar="HxW",
                     help="Image size the ratio is measured at; default: the first size the embedded default was "
                          "trained on, else 448x448."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def vision_cut_option(fn):
    return click.option(
        "--vision-cut", "vision_cut", metavar="BLOCK:KEEP",
        help="Beyond the paper: also cut inside the vision tower, keeping KEEP of the visual tokens after its "
             "full-attention block BLOCK (by the attention they received there); the rest of the tower, the "
             "merger and the LLM run on the kept ones. Qwen2.5-VL; docs/vision-cut.md.")(fn)


def pick_vision_cut(kwargs: dict):
    from ..graphs.pruning import VisionCut

    text = kwargs.pop("vision_cut")
    return VisionCut.parse(text) if text else None


def pick_search(kwargs: dict):
    """--target-ratio / --ratio-kind / --bucket -> a stages.calibrate.Search, or None without a target."""
    from ..stages.calibrate import Search
    from ..stages.export import parse_image_size

    bucket, target, kind = kwargs.pop("bucket"), kwargs.pop("target_ratio"), kwargs.pop("ratio_kind")
    if target is None and bucket is not None:
        raise CliError("--bucket is the image size --target-ratio measures FLOPs at; add --target-ratio R or drop "
                       "--bucket", 2)
    bucket = parse_image_size(bucket, "--bucket") if bucket else None
    return None if target is None else Search(target, kind, bucket)


def pick_overrides(kwargs: dict) -> dict:
    return {key: kwargs.pop(key) for key in ("ivr_layer", "keep_ratio", "anchor_ratio", "ssr_layer", "ssr_mode",
                                             "ssr_ratio")}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(VERSION, prog_name="halfv-export")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """HalfV visual-token pruning baked into deployable VLM engines.

    \b
    Stages: calibrate -> export -> engine -> validate (`build` runs all four).
    Backbones: qwen2.5-vl, llava-1.5, llava-next. Without --model, each backbone's embedded default is used: a
    small model shipped with the package, trained on the digit-grid task (`make-task`).
    """
    ctx.obj = {"debug": debug}


@cli.command(epilog=EPILOG_CALIBRATE)
@click.option("--backbone", required=True, help="Backbone adapter, e.g. qwen2.5-vl.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Local checkpoint directory (safetensors).")
@click.option("--data", type=click.Path(path_type=Path), help="prompts.jsonl or a folder with one; default: synthetic set.")
@click.option("--samples", type=click.IntRange(1), default=None,
              help="Built-in calibration samples to generate (task or synthetic): 8, or 32 with --target-ratio.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the built-in calibration data.")
@click.option("--random-weights", "random_weights", type=int, default=None, metavar="SEED",
              help="Embedded default only: seeded random weights instead of the shipped trained ones (tests the "
                   "machinery; the curves then say nothing about a trained model).")
@click.option("--tme-k", type=click.IntRange(1), default=50, show_default=True, help="Eigenvalues kept by the TME.")
@click.option("--kl-probe/--no-kl-probe", default=True, show_default=True,
              help="Run the visual-update KL probe (L extra prefills per sample) to pick the SSR mode.")
@click.option("--paper-values", is_flag=True, help="Skip the rules: paper values (at the model's relative depth).")
@schedule_options
@search_options
@vision_cut_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@user_errors
def calibrate(backbone, model_dir, data, samples, seed, random_weights, tme_k, kl_probe, paper_values, out, **kwargs):
    """Measure per-layer redundancy and write schedule.json + tme.png.

    Runs calibration images + prompts through the unpruned eager model, computes truncated matrix entropy of the
    visual / text / whole hidden states per layer and the visual-update KL probe, and derives the HalfV schedule
    (IVR layer, SSR layer, SSR mode); the paper's values fill the rest and any field can be overridden.

    With --target-ratio R it searches instead: the grid schedules whose FLOPs ratio at --bucket reaches R (the
    token frontier of each structure) run on the calibration samples, shared prefixes once, and the one closest to
    the unpruned model wins (task accuracy decides among the closest when the data has answers); the log goes into schedule.json["search"], the Pareto
    front into pareto.png. With --ratio-kind ttft on Qwen2.5-VL the search also pairs the schedules with cuts inside
    the vision tower (beyond the paper; docs/vision-cut.md), unless --vision-cut holds one fixed.
    """
    from ..stages.calibrate import Probes, calibrate as run
    from .render import RichProgress, calibration_summary

    overrides, search, cut = pick_overrides(kwargs), pick_search(kwargs), pick_vision_cut(kwargs)
    with RichProgress() as progress:
        calibration = run(backbone, out, model=model_dir, data=data, random_weights=random_weights,
                          paper_values=paper_values, overrides=overrides, search=search, vision_cut=cut,
                          probes=Probes(samples=samples, seed=seed, tme_k=tme_k, kl=kl_probe), progress=progress)
    calibration_summary(calibration)


@cli.command(epilog=EPILOG_FLOPS)
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="A HF config.json.")
@click.option("--schedule", "schedule_path", type=click.Path(path_type=Path), help="schedule.json to read.")
@schedule_options
@click.option("--visual-tokens", "visual", type=click.IntRange(0), multiple=True, required=True,
              help="Visual tokens N (repeat for a sweep).")
@click.option("--text-tokens", type=click.IntRange(0), default=64, show_default=True, help="Other prompt tokens T.")
@click.option("--end-to-end", is_flag=True,
              help="Add the vision encoder (time to first token = vision + prefill) and print both ratios.")
@click.option("--vision-cut", "vision_cut", metavar="BLOCK:KEEP",
              help="Also count a vision cut: keep KEEP of the visual tokens after the tower's block BLOCK (the LLM "
                   "then gets the kept ones); implies --end-to-end.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def flops(config_path, schedule_path, visual, text_tokens, end_to_end, vision_cut, as_json, **kwargs):
    """Prefill FLOPs of the LLM, full vs HalfV, and their ratio.

    Counts GQA projections, the full attention rectangle, and SwiGLU MLPs per layer; frozen visual rows (freeze
    mode) still pay their K/V projections. Selection overhead (scores, farthest-point similarity) is reported
    separately and not in the ratio. Without --schedule or flags, the backbone's paper schedule is used.

    --end-to-end adds the vision encoder, which HalfV does not prune: Qwen2.5-VL's windowed and full-attention
    blocks counted as they run on a square grid of N merged tokens (border windows included), LLaVA's CLIP tower
    once per 576 tokens; it prints the end-to-end (TTFT) ratio next to the prefill ratio.

    --vision-cut BLOCK:KEEP adds a cut inside the tower (beyond the paper; docs/vision-cut.md): the blocks after
    BLOCK run on the kept tokens, the LLM gets only those (the schedule then prunes among them).
    """
    from ..stages.flops import flops_table

    from ..graphs.pruning import VisionCut

    cut = VisionCut.parse(vision_cut) if vision_cut else None
    end_to_end = end_to_end or cut is not None
    rows, described = flops_table(config_path, schedule_path, pick_overrides(kwargs), list(visual), text_tokens,
                                  end_to_end, cut)
    if as_json:
        click.echo(json.dumps({"schedule": described, "rows": rows}, indent=2))
        return
    click.echo(f"schedule: {described}")
    e2e_head = f" {'vision TFLOP':>13} {'e2e ratio':>10}" if end_to_end else ""
    e2e_head += f" {'kept':>6} {'cut vision TFLOP':>17} {'cut e2e ratio':>14}" if cut else ""
    click.echo(f"{'visual':>7} {'text':>5} {'full TFLOP':>11} {'halfv TFLOP':>12} {'overhead GFLOP':>15} {'ratio':>7}"
               + e2e_head)
    for r in rows:
        e2e = f" {r['vision'] / 1e12:>13.3f} {r['e2e_ratio']:>10.3f}" if end_to_end else ""
        if cut and "e2e_cut_ratio" in r:
            e2e += f" {r['cut_tokens']:>6} {r['vision_cut'] / 1e12:>17.3f} {r['e2e_cut_ratio']:>14.3f}"
        click.echo(f"{r['visual']:>7} {r['text']:>5} {r['full'] / 1e12:>11.3f} {r['halfv'] / 1e12:>12.3f} "
                   f"{r['overhead'] / 1e9:>15.2f} {r['ratio']:>7.3f}" + e2e)
    for r in rows:
        suffix = f"  (N={r['visual']})" if len(rows) > 1 else ""
        click.echo(f"ratio: {r['ratio']:.3f}" + suffix)
        if end_to_end:
            click.echo(f"end-to-end ratio: {r['e2e_ratio']:.3f}" + suffix)
        if cut and "e2e_cut_ratio" in r:
            click.echo(f"end-to-end ratio with the vision cut: {r['e2e_cut_ratio']:.3f}" + suffix)


EPILOG_EXPORT = """\b
Examples:
  halfv-export export --schedule build/schedule.json --out build/
  halfv-export export --schedule build/schedule.json --model ./Qwen2.5-VL-3B-Instruct --image-size 448x448 \\
      --image-size 336x504 --out build/
  halfv-export export --schedule build/schedule.json --quantize int4 --out build-int4/
"""


def quantize_option(fn):
    return click.option("--quantize", metavar="int4|int8", help="Weight-only quantisation of the LLM graphs' MatMuls "
                        "for ONNX Runtime (int4: MatMulNBits, blocks of 32; int8: per output channel); embed and "
                        "vision stay float. fp32 only; not for --target tensorrt.")(fn)


def image_size_option(fn):
    return click.option("--image-size", "image_sizes", multiple=True,
                        help="HEIGHTxWIDTH bucket to export (repeatable); default: the buckets of 448x448 and 336x504.")(fn)


@cli.command(epilog=EPILOG_EXPORT)
@click.option("--schedule", "schedule_path", required=True, type=click.Path(path_type=Path), help="schedule.json.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Local checkpoint (default: as calibrated).")
@image_size_option
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Weights and activations; scores, softmax, norms and the FPS fill stay fp32.")
@quantize_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifacts directory.")
@user_errors
def export(schedule_path, model_dir, image_sizes, precision, quantize, out):
    """Trace the model with the schedule baked in -> ONNX graphs.

    Per image-size bucket: vision_HxW.onnx (pixels -> visual features) and prefill_HxW.onnx (IVR and SSR as
    TopK / ArgMax / Gather ops with static K); once: embed.onnx, prefill_full.onnx, decode.onnx (three cache-length
    groups), decode_full.onnx; artifacts.json and manifest.json (sha256 of every file).
    """
    from ..stages.export import export as run, parse_image_size
    from .render import RichProgress

    with RichProgress() as progress:
        meta = run(schedule_path, out, model=model_dir, image_sizes=[parse_image_size(s) for s in image_sizes],
                   precision=precision, quantize=quantize, progress=progress).meta
    for b in meta["buckets"]:
        cut = f" -> cut {b['kept_visual']}" if meta.get("vision_cut") else ""
        click.echo(f"bucket {b['size'][0]}x{b['size'][1]}: N={b['num_visual']}{cut} -> K1={b['k1']} -> K2={b['k2']}")
    if meta["quantize"]:
        q = meta["quantize"]
        click.echo(f"quantised {q['scheme']} ({q['op']}): the weight MatMuls of {', '.join(q['graphs'])}; "
                   f"{meta['weights']['quantized_bytes']:,} of weights.bin's {meta['weights']['bytes']:,} bytes")
    click.echo(f"wrote {len(meta['graphs'])} graphs to {out}")


@cli.command(epilog="""\b
Examples:
  halfv-export engine --artifacts build/ --target onnxruntime
  halfv-export engine --artifacts build/ --target onnxruntime --ep cuda
  halfv-export engine --artifacts build/ --target onnxruntime --no-fuse-attention
""")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Directory written by export.")
@click.option("--target", default="onnxruntime", show_default=True, help="onnxruntime or tensorrt.")
@click.option("--ep", default="cpu", show_default=True, help="ONNX Runtime execution provider: cpu, cuda, tensorrt.")
@click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True, help="TensorRT profiles: batch.")
@click.option("--min-text", type=click.IntRange(1), default=8, show_default=True, help="TensorRT profiles: text tokens.")
@click.option("--opt-text", type=click.IntRange(1), default=64, show_default=True)
@click.option("--max-text", type=click.IntRange(1), default=512, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="TensorRT decode profiles: cache growth.")
@click.option("--workspace-mib", type=click.IntRange(64), default=4096, show_default=True)
@click.option("--fuse-attention/--no-fuse-attention", default=True, show_default=True,
              help="onnxruntime CPU: run the prefill graphs' causal attention in ORT's GroupQueryAttention kernel.")
@user_errors
def engine(artifacts, target, ep, max_batch, min_text, opt_text, max_text, max_new_tokens, workspace_mib,
           fuse_attention):
    """Build engines for this machine.

    \b
    onnxruntime: every graph opened once with full optimisation on the provider (CPU, or --ep cuda / tensorrt
                 with onnxruntime-gpu); ort/engine.json records it. No optimised copies are saved: sessions
                 optimise at creation and share one memory-mapped weights.bin. On CPU the prefill graphs'
                 causal attention runs fused (com.microsoft GroupQueryAttention; the rewritten graphs, without
                 their weights, go to ort/, and the exported ONNX stays plain and TensorRT-clean); run / validate
                 / serve follow engine.json.
    tensorrt:    TensorRT plans in trt/, one optimisation profile per image bucket with text-length min/opt/max,
                 strongly typed (the graphs' fp32 scores, norms and softmax stay fp32), timing cache reused, and
                 trt/engine.json (TensorRT version, GPU, compute capability, profiles, ONNX sha256).
    """
    from ..engines import EngineOptions, get_target
    from ..engines.trt_plan import PlanOptions
    from ..stages.engine import engine as run
    from .render import RichProgress

    plan = PlanOptions(max_batch=max_batch, min_text=min_text, opt_text=opt_text, max_text=max_text,
                       max_new_tokens=max_new_tokens, workspace_mib=workspace_mib)
    with RichProgress() as progress:
        info = run(artifacts, target, EngineOptions(ep=ep, plan=plan, fuse_attention=fuse_attention),
                   progress=progress).info
    where = artifacts / get_target(target).engine_dir
    click.echo(f"{info['target']} ({', '.join(info['providers'])}): {len(info['graphs'])} graphs built into {where}")
    fused = sum(info.get("fused_attention", {}).values())
    if fused:
        click.echo(f"fused attention: {fused} causal attention sites run as GroupQueryAttention")
    for graph, why in info.get("fusion_refused", {}).items():
        click.echo(f"{graph}: fused attention refused by ONNX Runtime, the graph runs as exported ({why})")


@cli.command(epilog="""\b
Examples:
  halfv-export lint --artifacts build/
""")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Directory written by export.")
@user_errors
def lint(artifacts):
    """TensorRT-readiness without TensorRT: supported ops, sorted TopK with constant K <= 3840, no data-dependent
    shapes, constant axes, supported opset. Exit 1 on any finding."""
    from ..stages.export import lint as run

    graphs, findings = run(artifacts)
    for finding in findings:
        click.echo(str(finding))
    if findings:
        raise CliError(f"{len(findings)} TensorRT-readiness finding(s) in {len(graphs)} graphs", 1)
    click.echo(f"{len(graphs)} graphs TensorRT-ready: no findings")


@cli.command(epilog="""\b
Examples:
  halfv-export run --artifacts build/ --image photo.png --prompt "What is in this picture?"
  halfv-export run --artifacts build/ --image photo.png --prompt "Read the sign." --max-new-tokens 64 --full
  halfv-export run --artifacts build/ --prompt "Write a haiku about pruning." --stream
""")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Directory written by export.")
@click.option("--image", type=click.Path(path_type=Path), help="Image file (omit for a text-only prompt).")
@click.option("--prompt", required=True, help="The question.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--full", is_flag=True, help="Use the unpruned graphs instead of HalfV.")
@click.option("--stream", is_flag=True, help="Print the answer token by token as it is decoded.")
@click.option("--target", default="onnxruntime", show_default=True, help="Engines to run: onnxruntime or tensorrt.")
@click.option("--ep", default="cpu", show_default=True, help="ONNX Runtime execution provider: cpu, cuda, tensorrt.")
@user_errors
def run(artifacts, image, prompt, max_new_tokens, full, stream, target, ep):
    """Greedy generation over the exported engines; prints the answer (halfv_export.load(...).generate)."""
    from ..engines.api import load

    model = load(artifacts, target=target, ep=ep)
    if not stream:
        click.echo(model.generate(image, prompt, max_new_tokens=max_new_tokens, full=full).text)
        return
    for piece in model.stream(image, prompt, max_new_tokens=max_new_tokens, full=full):
        click.echo(piece.text, nl=False)
    click.echo()


@cli.command(epilog="""\b
Examples:
  halfv-export serve --artifacts build/
  halfv-export serve --artifacts build/ --port 8080 --max-batch 8 --batch-wait-ms 20 --allow-images-from ./images
\b
  printf '{"max_tokens": 16, "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,%s"}}]}]}' "$(base64 -w0 photo.png)" > request.json
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d @request.json
""")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Directory written by build/export.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (no authentication: keep "
              "it on loopback or behind a proxy).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most requests of one bucket prefilled and decoded together.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10_000), default=10.0, show_default=True,
              help="How long the oldest waiting request may wait for others of its bucket.")
@click.option("--allow-images-from", "allow_images_from", multiple=True, type=click.Path(path_type=Path),
              help="Folder whose images requests may name by path (repeatable); default: data: URLs only.")
@click.option("--max-body-mib", type=click.FloatRange(0.01, 1024), default=20.0, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
              help="Waiting requests beyond this get 503.")
@click.option("--max-model-len", type=click.IntRange(16), help="Prompt + max_tokens limit (default: the model's "
              "context, at most 8192).")
@click.option("--served-model-name", help="The model id clients send (default: <backbone>-halfv).")
@click.option("--target", default="onnxruntime", show_default=True, help="Engines to run: onnxruntime or tensorrt.")
@click.option("--ep", default="cpu", show_default=True, help="ONNX Runtime execution provider: cpu, cuda, tensorrt.")
@user_errors
def serve(artifacts, host, port, max_batch, batch_wait_ms, allow_images_from, max_body_mib, max_queue, max_model_len,
          served_model_name, target, ep):
    """An OpenAI-compatible server: POST /v1/chat/completions (text + one image as a data: URL or an allowed local
    path; stream: true for server-sent events), GET /v1/models, GET /metrics (batch sizes), GET /health.

    One engine thread runs batches of up to --max-batch waiting requests that share an image bucket; decoding is
    greedy. Remote image URLs are refused (no network). Stop with Ctrl-C.
    """
    try:
        from ..serving.server import Server, build_server
    except ImportError as e:
        raise CliError(f"serve needs FastAPI and uvicorn ({e.name} is missing); pip install 'halfv-export[serve]'",
                       2) from None
    app, batcher, name = build_server(artifacts, target=target, ep=ep, max_batch=max_batch,
                                      batch_wait_ms=batch_wait_ms, allow_images_from=allow_images_from,
                                      max_body_mib=max_body_mib, max_queue=max_queue, served_name=served_model_name,
                                      max_model_len=max_model_len)
    server = Server(app, batcher, host, port)
    click.echo(f"serving {name} ({batcher.model.describe()}) at {server.url}/v1 "
               f"(max batch {max_batch}, batch wait {batch_wait_ms:g} ms); Ctrl-C stops", err=True)
    server.serve_forever()
    click.echo("stopped", err=True)


@cli.command(epilog="""\b
Examples:
  halfv-export triton --artifacts build/ --out model_repository/
  halfv-export triton --artifacts build/ --out model_repository/ --kind gpu --instances 2
  halfv-export triton --artifacts build/ --out model_repository/ --graph-backend python   # Python-backend-only servers
  halfv-export engine --artifacts build/ --target tensorrt      # on the serving GPU, then:
  halfv-export triton --artifacts build/ --out model_repository/ --graph-backend tensorrt
\b
  docker run --rm --shm-size=2g -p 8000:8000 -p 8001:8001 -v $PWD/model_repository:/models \\
      nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
      # the image must also hold this package's runtime install (Python 3.11+): docs/triton.md
""")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Directory written by build.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The model repository to write.")
@click.option("--graph-backend", type=click.Choice(["onnxruntime", "python", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Run each graph on Triton's onnxruntime backend, with ONNX Runtime inside "
              "the Python backend, or as the build's TensorRT plans on Triton's tensorrt backend.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Instance kind of the graph models [default: gpu for tensorrt, else cpu].")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Instances of each graph model.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most requests the orchestrator runs together (Triton's dynamic batcher fills it).")
@click.option("--queue-delay-ms", type=click.FloatRange(0, 10_000), default=10.0, show_default=True,
              help="How long the dynamic batcher waits for more requests.")
@user_errors
def triton(artifacts, out, graph_backend, kind, instances, max_batch, queue_delay_ms):
    """A Triton Inference Server model repository for a build: one model per graph, and an orchestrator (Python
    backend: image bytes + prompt in, text out; `halfv` answers whole, `halfv_stream` streams pieces, decoupled).

    The repository holds the build once; its Python models import this package's runtime install. Layout, the
    request format and scaling out: docs/triton.md.
    """
    from ..serving.triton import TritonOptions, write_repository

    summary = write_repository(artifacts, out, TritonOptions(graph_backend=graph_backend, kind=kind,
                                                             instances=instances, max_batch=max_batch,
                                                             queue_delay_us=int(queue_delay_ms * 1000)))
    graphs = [name for name, backend in summary["models"].items() if not backend.startswith("python (")]
    trt = summary.get("tensorrt")
    where = f" (plans for {trt['gpu']}, sm {trt['compute_capability']}, TensorRT {trt['version']}: serve them on that " \
            "GPU with a Triton of that TensorRT)" if trt else ""
    click.echo(f"wrote {out}: orchestrators halfv, halfv_stream and {len(graphs)} graph models on the "
               f"{graph_backend} backend{where}; start it with `tritonserver --model-repository={out}`")


def latency_runs_option(fn):
    return click.option("--latency-runs", type=click.IntRange(1), default=7, show_default=True,
                        help="Timed runs (after a warm-up) per latency row; the rows run the vision tower six times "
                        "each, so a 1792x1792 bucket wants 1.")(fn)


@cli.command(epilog="""\b
Examples:
  halfv-export validate --artifacts build/
  halfv-export validate --artifacts build/ --data heldout/ --fail-under parity.kept_indices_match=1.0 \\
      --fail-over parity.logits_max_abs_diff=1e-3
  halfv-export validate --artifacts build-1792/ --latency-runs 1
  halfv-export make-task --backbone qwen2.5-vl --out evalset/
  halfv-export validate --artifacts build/ --data evalset/ --baselines --fail-under accuracy.retention=0.95
""")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path), help="Directory written by export.")
@click.option("--data", type=click.Path(path_type=Path), help="prompts.jsonl or a folder with one; default: held-out synthetic.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Eager reference checkpoint (default: as exported).")
@click.option("--fail-under", multiple=True, help="KEY=VALUE: fail (exit 1) when the metric is below VALUE.")
@click.option("--fail-over", multiple=True, help="KEY=VALUE: fail (exit 1) when the metric is above VALUE.")
@click.option("--target", default="onnxruntime", show_default=True, help="Engines to check: onnxruntime or tensorrt.")
@click.option("--baselines", is_flag=True,
              help="Also score random / attention-only / IVR-without-SSR selection at HalfV's FLOPs (eager; needs "
                   "answers in --data).")
@latency_runs_option
@user_errors
def validate(artifacts, data, model_dir, fail_under, fail_over, target, latency_runs, baselines):
    """Compare the engines with the eager reference -> report.json, report.md, latency.png.

    Parity (kept indices, logits, 16 greedy tokens) against eager HalfV with the same schedule; fidelity of HalfV
    against the unpruned eager model; prefill and decode latency; FLOPs. When --data lines carry an "answer":
    exact-match accuracy of the unpruned eager model (accuracy.full), eager HalfV (accuracy.halfv), the exported
    HalfV graphs (accuracy.engine) and accuracy.retention = halfv / full, overall and per question type. Without
    --data, the trained embedded default is scored on its own task. Thresholds make it a CI gate.
    """
    from ..measure.report import parse_thresholds
    from ..stages.validate import validate as run
    from .render import RichProgress, validation_summary

    with RichProgress() as progress:
        report = run(artifacts, data=data, model=model_dir, fail_under=parse_thresholds(fail_under, "--fail-under"),
                     fail_over=parse_thresholds(fail_over, "--fail-over"), target=target, latency_runs=latency_runs,
                     baselines=baselines, progress=progress)
    validation_summary(report.data)
    if report.failures:
        raise CliError("validation failed: " + "; ".join(report.failures), 1)


@cli.command(epilog="""\b
Examples:
  halfv-export build --backbone qwen2.5-vl --out build/
  halfv-export build --backbone qwen2.5-vl --model ./Qwen2.5-VL-3B-Instruct --image-size 448x448 --out build/
  halfv-export build --backbone qwen2.5-vl --model ./ckpt --image-size 1792x1792 --latency-runs 1 --out build-1792/
  halfv-export build --backbone qwen2.5-vl --target-ratio 2 --out build-fast/
  halfv-export build --backbone qwen2.5-vl --model ./page-model --vision-cut 1:0.5 --out build-cut/
""")
@click.option("--backbone", required=True, help="Backbone adapter, e.g. qwen2.5-vl.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Local checkpoint directory (safetensors).")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration data (prompts.jsonl or folder).")
@image_size_option
@click.option("--target", default="onnxruntime", show_default=True, help="Engine target: onnxruntime or tensorrt.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Exported precision (fp16/bf16 keep scores, softmax and norms in fp32).")
@click.option("--paper-values", is_flag=True, help="Skip the calibration rules: paper values.")
@click.option("--random-weights", "random_weights", type=int, default=None, metavar="SEED",
              help="Embedded default only: seeded random weights instead of the shipped trained ones.")
@schedule_options
@search_options
@vision_cut_option
@latency_runs_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@user_errors
def build(backbone, model_dir, data, image_sizes, target, precision, paper_values, random_weights, latency_runs, out,
          **kwargs):
    """calibrate -> export -> engine -> validate, gated on parity with the fp32 eager reference (kept indices 1.0,
    greedy tokens 1.0, logits within 1e-3; fp16/bf16 builds are reported, not gated)."""
    from ..stages.build import BuildFailed, build as run
    from ..stages.export import parse_image_size
    from .render import RichProgress, build_table, layer_fallbacks

    try:
        with RichProgress() as progress:
            result = run(backbone, out, model=model_dir, data=data,
                         image_sizes=[parse_image_size(s) for s in image_sizes], target=target, precision=precision,
                         paper_values=paper_values, random_weights=random_weights, overrides=pick_overrides(kwargs),
                         search=pick_search(kwargs), vision_cut=pick_vision_cut(kwargs), latency_runs=latency_runs,
                         progress=progress)
    except BuildFailed as e:
        layer_fallbacks(e.calibration, err=True)
        build_table(e.artifacts.meta, e.report.data)
        raise
    layer_fallbacks(result.calibration, err=True)
    build_table(result.artifacts.meta, result.report.data)
    click.echo(f"build complete: {out}")


@cli.command("make-task", epilog="""\b
Examples:
  halfv-export make-task --backbone qwen2.5-vl --out evalset/
  halfv-export make-task --image-size 224x224 --image-size 224x336 --count 500 --seed 7 --out evalset/
  halfv-export make-task --backbone llava-1.5 --mix digit_at=1,count_all=1 --count 100 --out quick/
  halfv-export make-task --task page --image-size 448x448 --image-size 392x504 --count 1000 --out pages/
""")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for images/ + prompts.jsonl.")
@click.option("--backbone", help="Use the image sizes this backbone's embedded default was trained on.")
@click.option("--image-size", "image_sizes", multiple=True, help="HEIGHTxWIDTH (repeatable); default: the backbone's "
              "trained sizes, else 224x224.")
@click.option("--count", type=click.IntRange(1, 100_000), default=200, show_default=True, help="Questions (one image each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generator.")
@click.option("--split", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="Which digit scans to draw from (disjoint: every 5th scan of load_digits is held out for eval).")
@click.option("--mix", help="Question types and weights, e.g. digit_at=3,read_all=1 (default: the training mix).")
@click.option("--slot", type=click.IntRange(8, 56), help="Digit slot in pixels (default: the backbone's training "
              "setting, else 28).")
@click.option("--task", type=click.Choice(["page", "grid"]), help="page: a small block of digits on a large "
              "paper-like page; grid: a digit grid over the whole image (default: the task the backbone's embedded "
              "default was trained on, else page).")
@user_errors
def make_task(out, backbone, image_sizes, count, seed, split, mix, slot, task):
    """Write a fixed evaluation set of the digit task: images/*.png and prompts.jsonl with "answer" and "type".

    \b
    Real handwritten digit scans (scikit-learn's load_digits), at varied scales and offsets, with questions about
    the digits' rows and columns: digit_at (row r, column c), row_digits, count_digit, count_all, read_all.
    page: a block of 2-8 digits (a grid, a line or spread apart) somewhere on a page whose background (gradients,
    grain, ruled lines, faint marks) is most of the image, as on a high-resolution document. grid: 56-pixel cells
    over the whole image (4x4 at 224x224) holding two to six digits. Same arguments, same files. Feed the folder to
    `validate --data` or `compare --data`.
    """
    from ..stages.data import make_task as run
    from ..stages.export import parse_image_size

    made = run(out, backbone=backbone, image_sizes=[parse_image_size(s) for s in image_sizes], count=count, seed=seed,
               split=split, mix=mix, slot=slot, task=task)
    sizes = ", ".join(f"{h}x{w}" for h, w in made.info["image_sizes"])
    click.echo(f"wrote {count} {made.kind} questions ({sizes}; "
               f"{', '.join(f'{k} {v}' for k, v in made.types.items())}) "
               f"to {out / 'prompts.jsonl'}")


@cli.command(epilog="""\b
Examples:
  halfv-export compare --backbone qwen2.5-vl --data evalset/ --out compare-qwen/
  halfv-export compare --backbone llava-1.5 --schedule build/schedule.json --keep-ratio 0.25 --keep-ratio 0.5 \\
      --data evalset/ --out compare-llava/
  halfv-export compare --backbone qwen2.5-vl --vision-cut 1:0.5 --keep-ratio 0.5 --data pages/ --out compare-cut/
""")
@click.option("--backbone", required=True, help="Backbone adapter, e.g. qwen2.5-vl.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Local checkpoint (default: embedded).")
@click.option("--data", type=click.Path(path_type=Path),
              help="prompts.jsonl (with answers) or its folder; default: 200 questions of the embedded task.")
@click.option("--schedule", "schedule_path", type=click.Path(path_type=Path),
              help="Base schedule (default: the paper's values at this depth); its keep ratio is swept.")
@click.option("--keep-ratio", "keep_ratios", type=click.FloatRange(0, 1, min_open=True), multiple=True,
              help="IVR keep ratios to sweep (repeatable); default 0.1, 0.25, 0.5, 0.75.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-selection baseline.")
@vision_cut_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="compare.json, compare.md, accuracy_flops.png.")
@user_errors
def compare(backbone, model_dir, data, schedule_path, keep_ratios, seed, out, **kwargs):
    """HalfV against ablation baselines at the same prefill FLOPs: accuracy vs FLOPs over keep ratios.

    \b
    For every keep ratio, HalfV (IVR + SSR) and three single-cut baselines at HalfV's IVR layer, each keeping the
    number of visual rows that spends HalfV's prefill FLOPs: random selection, attention-only (top-K by the
    same last-token scores, FastV-like) and IVR without SSR. Eager PyTorch, greedy answers, exact match. With a
    vision cut (--vision-cut, or the --schedule file's) every method runs on the cut tower's tokens, and the TTFT
    FLOPs fraction counts the tower too.
    """
    from ..stages.compare import DEFAULT_KEEP_RATIOS, compare as run
    from .render import RichProgress

    cut = pick_vision_cut(kwargs)
    with RichProgress() as progress:
        result = run(backbone, out, model=model_dir, data=data, schedule=schedule_path,
                     keep_ratios=list(keep_ratios) or list(DEFAULT_KEEP_RATIOS), seed=seed, vision_cut=cut,
                     progress=progress)
    click.echo(f"unpruned accuracy {result['full']['accuracy']:.4f} on {result['samples']} questions")
    if result["vision_cut"]:
        click.echo(f"vision cut after block {result['vision_cut']['block']} keep {result['vision_cut']['keep']:g} "
                   "for every method; accuracy@prefill/TTFT FLOPs fraction")
    for point in result["points"]:
        click.echo(f"keep {point['keep_ratio']:g}: " + "  ".join(
            f"{m} {row['accuracy']:.4f}@{row['flops_fraction']:.3f}"
            + (f"/{row['ttft_flops_fraction']:.3f}" if result["vision_cut"] else "")
            for m, row in point["methods"].items()))
    click.echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'accuracy_flops.png'}")


@cli.command(epilog="""\b
Examples:
  halfv-export bench --out bench/ --readme README.md
  halfv-export bench --visual-tokens 256 --layers 8 --no-genai --out bench-small/
  halfv-export bench --visual-tokens 1024 --vision-depth 8 --no-genai --out bench-ttft/
  halfv-export bench --visual-tokens 1024 --vision-depth 16 --vision-cut 7:0.5 --no-genai --out bench-cut/
  halfv-export bench --backbone llava-1.5 --hidden 1024 --heads 16 --kv-heads 16 --no-genai --out bench-llava/
  halfv-export bench --config Qwen2.5-VL-7B/config.json --layers 4 --visual-tokens 1024 --no-genai --out bench-7b/
  halfv-export bench --quantize int4 --reference-visual 256 --out bench-int4/
""")
@click.option("--backbone", default="qwen2.5-vl", show_default=True, help="Adapter whose LLM family is timed.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="A HF config.json: the LLM widths (and the backbone, from model_type); flags below override.")
@click.option("--visual-tokens", "visual", type=click.IntRange(4), multiple=True,
              help="N to sweep (an h x w merged grid, as square as N allows); default 256, 1024, 2048.")
@click.option("--reference-visual", type=click.IntRange(4), default=1024, show_default=True,
              help="N of the side-by-side, selection, decode and GenAI comparisons.")
@click.option("--text-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--hidden", type=click.IntRange(8), help="LLM hidden size [default: 896, or the config's].")
@click.option("--layers", type=click.IntRange(4), help="LLM layers [default: 24, or the config's].")
@click.option("--heads", type=click.IntRange(1), help="Attention heads [default: 14, or the config's].")
@click.option("--kv-heads", type=click.IntRange(1), help="KV heads [default: 2, or the config's].")
@click.option("--intermediate", type=click.IntRange(1), help="MLP width [default: 4864, or the config's].")
@click.option("--vocab", type=click.IntRange(16), help="Vocabulary [default: 151936, or the config's].")
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True, help="Timed runs after one warm-up.")
@click.option("--genai/--no-genai", default=True, show_default=True, help="Build and time the ONNX Runtime GenAI peer.")
@click.option("--vision/--no-vision", default=True, show_default=True,
              help="Time to first token: time the published vision tower (and the embedding) at the reference N.")
@click.option("--vision-depth", type=click.IntRange(1), help="Blocks of the published tower to time [default: all].")
@vision_cut_option
@click.option("--readme", type=click.Path(path_type=Path), help="Replace this README's performance section with bench.md.")
@click.option("--quantize", metavar="int4|int8", help="Only compare the quantised LLM graphs with fp32 at "
              "--reference-visual: prefill, decode step, artifact bytes -> quantize.json, quantize.md.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where bench.json, bench.md and plots go.")
@user_errors
def bench(backbone, config_path, visual, reference_visual, text_tokens, runs, genai, vision, vision_depth, readme,
          quantize, out, **kwargs):
    """Speed, memory and FLOPs side by side, in one process, on the same inputs.

    FLOPs ratio curves of the published configs; ONNX Runtime CPU prefill of the exported full vs HalfV graphs (the
    product's own graphs, exported by the same code as `export`) on a random-weight LLM of the backbone's family
    (default: Qwen2.5-VL at the 0.5B class) at each N; at the reference N: eager PyTorch HalfV and unpruned, the
    selection work alone, ONNX Runtime GenAI's unpruned graph, and a decode step with KV-cache bytes; peak memory of
    each; a GPU section when CUDA is present. Writes bench.json, bench.md, flops_ratio.png, prefill_latency.png.
    """
    from ..graphs.adapter import adapter_for_model_type, get_adapter
    from ..graphs.checkpoint import read_config_json
    from ..benchmarks.bench import BenchShape, run_bench
    from ..benchmarks.report import update_readme

    cut = pick_vision_cut(kwargs)
    widths = kwargs
    visual = tuple(visual) or (256, 1024, 2048)
    if cut is not None and quantize is not None:
        raise CliError("--quantize compares the LLM graphs alone; drop --vision-cut or --quantize", 2)
    if quantize is None and reference_visual not in visual:  # --quantize times the reference N alone
        raise CliError(f"--reference-visual {reference_visual} must be one of --visual-tokens {visual}", 2)
    adapter = get_adapter(backbone)
    if config_path is not None:
        model_type = str(read_config_json(config_path).get("model_type"))
        adapter = adapter_for_model_type(model_type) or adapter
        shape = BenchShape.from_config(config_path, **widths)
    else:
        shape = BenchShape(**{k: v for k, v in widths.items() if v is not None})
    if quantize is not None:
        from ..benchmarks.quantize import run_quant_bench

        run_quant_bench(out, adapter, shape, reference_visual, text_tokens, runs, quantize,
                        log=lambda m: click.echo(m, err=True))
        click.echo((out / "quantize.md").read_text())
        return
    launched = Path(sys.argv[0]).name == "halfv-export"  # else called from Python (tests): no honest argv
    command = "halfv-export " + shlex.join(sys.argv[1:]) if launched else "halfv-export bench (from Python)"
    r = run_bench(out, adapter, shape, visual, text_tokens, runs, reference_visual, genai,
                  log=lambda m: click.echo(m, err=True), vision=vision, vision_depth=vision_depth, command=command,
                  vision_cut=cut)
    click.echo((out / "bench.md").read_text())
    if readme is not None:
        update_readme(readme, (out / "bench.md").read_text())
        click.echo(f"updated the performance section of {readme}")
    ref = next(row for row in r["cpu_prefill"] if row["visual"] == reference_visual)
    click.echo(f"measured ratio: {ref['measured_ratio']:.2f}")
    click.echo(f"FLOPs ratio: {ref['flops_ratio']:.2f}")
    click.echo(f"efficiency: {ref['efficiency']:.2f}")
    if "engine_ttft_ratio" in r["ttft"]:
        click.echo(f"TTFT ratio (exported): {r['ttft']['engine_ttft_ratio']:.2f}")
        click.echo(f"TTFT FLOPs ratio: {r['ttft']['flops_ttft_ratio']:.2f}")


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="halfv-export", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing half-written was left behind", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
