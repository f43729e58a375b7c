"""bench.json -> bench.md, flops_ratio.png, prefill_latency.png; and the README's performance section, which is
bench.md verbatim between two markers."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import BadInput
from ..base.atomic import write_text_atomic
from ..measure.plots import plt, save_figure

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _ms(entry: dict) -> str:
    return f"{entry['median_ms']:.1f}"


def _mem(entry: dict) -> str:
    return f"{entry['peak_rss_mb']:.0f} (+{entry['rise_mb']:.0f})"


def render_bench(r: dict) -> str:
    s, sched = r["shape"], r["schedule"]
    lines = [
        f"Command: `{r['command']}` — {r['device']}; medians of {r['runs']} runs after a warm-up; 1-min load "
        f"average {r['load_average']['start']} at start, {r['load_average']['end']} at end (anything above ~0.5 means "
        f"other work shared the cores).",
        f"Model: {r['backbone']}-family LLM, hidden {s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} "
        f"heads, MLP {s['intermediate']}, vocab {s['vocab']}, **random weights** (speed only); {r['text_tokens']} text "
        f"tokens; paper schedule at this depth: IVR before layer {sched['ivr_layer']} keep {sched['keep_ratio']}, "
        f"SSR {sched['ssr_mode']} from layer {sched['ssr_layer']} keep {sched['ssr_ratio']}.", "",
        "**ONNX Runtime CPU prefill, exported graphs, same inputs**", "",
        "| visual tokens | full ms | HalfV ms | measured ratio | FLOPs ratio | efficiency | peak RSS MB (rise) full / HalfV |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["cpu_prefill"]:
        lines.append(f"| {row['visual']} | {_ms(row['full'])} | {_ms(row['halfv'])} | {row['measured_ratio']:.2f}× | "
                     f"{row['flops_ratio']:.2f}× | {row['efficiency']:.2f} | {_mem(row['full'])} / {_mem(row['halfv'])} |")
    ref = next(row for row in r["cpu_prefill"] if row["visual"] == r["eager"]["visual"])
    e, sel, dec, peer = r["eager"], r["selection"], r["decode"], r["genai"]
    lines += ["", f"**Side by side at {e['visual']} visual tokens**", "", "| prefill | ms | vs exported HalfV |",
              "|---|---|---|",
              f"| exported HalfV (ONNX Runtime) | {_ms(ref['halfv'])} | 1.00× |",
              f"| exported unpruned (ONNX Runtime) | {_ms(ref['full'])} | {ref['full']['median_ms'] / ref['halfv']['median_ms']:.2f}× |",
              f"| eager PyTorch HalfV reference | {_ms(e['halfv'])} | {e['halfv']['median_ms'] / ref['halfv']['median_ms']:.2f}× |",
              f"| eager PyTorch unpruned | {_ms(e['full'])} | {e['full']['median_ms'] / ref['halfv']['median_ms']:.2f}× |"]
    if "median_ms" in peer:
        lines.append(f"| ONNX Runtime GenAI builder, unpruned ({', '.join(peer['contrib_ops'])}) | {_ms(peer)} | "
                     f"{peer['halfv_speedup_over_genai']:.2f}× (needed ≥ {peer['needed']:.2f}) |")
    else:
        lines.append(f"| ONNX Runtime GenAI | — | {peer.get('error') or peer.get('skipped')} |")
    lines += ttft_lines(r.get("ttft") or {"skipped": "not measured"})
    lines += ["", f"Selection work alone (scores at L1−1 and L2−1, anchors, farthest-point fill, gathers; its own "
                  f"graph): {sel['median_ms']:.1f} ms = {100 * sel['share_of_halfv_prefill']:.1f}% of the HalfV prefill "
                  f"({100 * sel['flops_share']:.2f}% of its FLOPs).", "",
              "**Decode step (batch 1) and KV cache after the prefill**", "",
              "| cache | step ms | KV-cache MB | cache lengths | peak RSS MB (rise) |", "|---|---|---|---|---|"]
    for name in ("full", "halfv"):
        d = dec[name]
        lines.append(f"| {name} | {_ms(d)} | {d['kv_cache_bytes'] / 2**20:.1f} | {', '.join(map(str, d['cache_lengths']))} "
                     f"| {_mem(d)} |")
    lines += ["", f"KV cache {dec['kv_cache_ratio']:.2f}× smaller with HalfV; at batch 1 a decode step is bound by "
                  "reading the weights, so its time barely changes.", "",
              "Memory: peak resident set of the whole process while a measurement ran (session creation included) and, "
              "in brackets, its rise over the resident set just before; the process also holds the PyTorch model, and "
              "the allocator reuses memory freed by earlier sessions, so compare rises within a row, not across rows.",
              "",
              "**FLOPs ratio of the published configs (paper schedules, 64 text tokens)**", "",
              "| model | " + " | ".join(str(p["visual"]) for p in r["flops_curves"][0]["points"]) + " |",
              "|---|" + "---|" * len(r["flops_curves"][0]["points"])]
    for curve in r["flops_curves"]:
        lines.append(f"| {curve['model']} | " + " | ".join(f"{p['ratio']:.2f}×" for p in curve["points"]) + " |")
    gpu = r["gpu"]
    lines += ["", "**GPU**: " + (gpu["skipped"] if "skipped" in gpu else "; ".join(
        f"N={row['visual']}: eager {gpu['dtype']} full {row['full_ms']:.1f} ms / HalfV {row['halfv_ms']:.1f} ms "
        f"({row['measured_ratio']:.2f}× vs FLOPs {row['flops_ratio']:.2f}×)" for row in gpu["eager_prefill"])
        + f" on {gpu['device']}") + "."]
    return "\n".join(lines) + "\n"


def ttft_lines(t: dict) -> list[str]:
    if "skipped" in t:
        return ["", f"Time to first token: not measured ({t['skipped']})."]
    e, g = t["engine_ttft_ms"], t["eager_ttft_ms"]
    return [
        "", f"**Time to first token at {t['visual']} visual tokens** (embedding + vision tower + prefill; {t['tower']} "
        f"tower, depth {t['vision_depth']}, random weights, {t['bucket'][0]}x{t['bucket'][1]} px; sums of the stage "
        "medians)", "",
        "| | embedding ms | vision ms | TTFT full ms | TTFT HalfV ms | TTFT ratio | prefill-only ratio |",
        "|---|---|---|---|---|---|---|",
        f"| exported (ONNX Runtime) | {_ms(t['embed_ort'])} | {_ms(t['vision_ort'])} | {e['full']:.1f} | "
        f"{e['halfv']:.1f} | {t['engine_ttft_ratio']:.2f}× | {t['prefill_ratio']:.2f}× |",
        f"| eager PyTorch | {_ms(t['embed_eager'])} | {_ms(t['vision_eager'])} | {g['full']:.1f} | {g['halfv']:.1f} | "
        f"{t['eager_ttft_ratio']:.2f}× | |",
        "", f"FLOPs: vision {t['vision_tflop']:.3f} TFLOP; prefill ratio {t['flops_prefill_ratio']:.2f}×, end-to-end "
        f"(TTFT) ratio {t['flops_ttft_ratio']:.2f}×. Vision peak RSS MB (rise): exported {_mem(t['vision_ort'])}, "
        f"eager {_mem(t['vision_eager'])}.",
    ] + cut_lines(t)


def cut_lines(t: dict) -> list[str]:
    """HalfV behind a vision cut (bench --vision-cut), beside LLM-only HalfV at the same N."""
    c = t.get("cut")
    if not c:
        return []
    e = t["engine_ttft_ms"]
    return [
        "", f"**With a vision cut** after tower block {c['block']}, keep {c['keep']:g} ({t['visual']} -> {c['kept']} "
        "tokens; the HalfV prefill runs on the kept rows; docs/vision-cut.md):", "",
        "| | vision ms | HalfV prefill ms | TTFT ms | TTFT ratio (full / this) |", "|---|---|---|---|---|",
        f"| exported, LLM-only HalfV | {_ms(t['vision_ort'])} | {t['halfv_prefill_ms']:.1f} | "
        f"{e['halfv']:.1f} | {t['engine_ttft_ratio']:.2f}× |",
        f"| exported, HalfV + vision cut | {_ms(c['vision_ort'])} | {_ms(c['prefill_ort'])} | {c['engine_ttft_ms']:.1f} | "
        f"{c['engine_ttft_ratio']:.2f}× |",
        f"| eager, HalfV + vision cut | {_ms(c['vision_eager'])} | {_ms(c['prefill_eager'])} | {c['eager_ttft_ms']:.1f} | "
        f"{c['eager_ttft_ratio']:.2f}× |",
        "", f"Cut tower {c['vision_ratio']:.2f}× faster than the whole one (exported); FLOPs: cut tower "
        f"{c['vision_tflop']:.3f} TFLOP, end-to-end (TTFT) ratio {c['flops_ttft_ratio']:.2f}× against "
        f"{t['flops_ttft_ratio']:.2f}× for LLM-only HalfV.",
    ]


def bench_plots(r: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for curve in r["flops_curves"]:
        xs = [p["visual"] for p in curve["points"]]
        ax.plot(xs, [p["ratio"] for p in curve["points"]], marker="o", label=curve["model"].split("/")[-1])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens N")
    ax.set_ylabel("prefill FLOPs full / HalfV")
    ax.set_title("FLOPs ratio, paper schedules (64 text tokens)", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, out / "flops_ratio.png")

    rows = r["cpu_prefill"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [row["full"]["median_ms"] for row in rows], width, label="exported full",
           color="#8a96a3")
    ax.bar([x + width / 2 for x in xs], [row["halfv"]["median_ms"] for row in rows], width, label="exported HalfV",
           color="tab:green")
    for x, row in zip(xs, rows):
        ax.text(x + width / 2, row["halfv"]["median_ms"], f"{row['measured_ratio']:.2f}×", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(list(xs), [f"N={row['visual']}" for row in rows])
    ax.set_ylabel("prefill ms (median), ONNX Runtime CPU")
    ax.set_title(f"{r['shape']['layers']}-layer, hidden {r['shape']['hidden']} LLM, random weights", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, out / "prefill_latency.png")


def update_readme(readme: Path, bench_md: str) -> None:
    text = Path(readme).read_text()
    if START not in text or END not in text:
        raise BadInput(f"{readme} has no '{START}' ... '{END}' markers around its performance section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(Path(readme), f"{head}{START}\n{bench_md}{END}{tail}")
