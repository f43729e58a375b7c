"""Pictures people look at: the TME curves with the chosen layers (calibration)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..base.atomic import write_bytes_atomic  # noqa: E402

_NAN = float("nan")


def _series(values):
    return [_NAN if v is None else v for v in values]


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())


def tme_plot(curves: dict, schedule: dict, title: str, path: Path) -> None:
    """Top: TME H1 of visual / text / whole rows per layer point, stages shaded, L1 and L2 marked.
    Bottom: the visual-update KL probe per layer (log scale), the paper's Fig. 2(d); the SSR mode itself is chosen
    by the whole-cut probe (calibration.ssr_modes in schedule.json)."""
    l1, l2 = schedule["ivr_layer"], schedule["ssr_layer"]
    depth = len(curves["whole"]) - 1
    x = list(range(depth + 1))
    has_kl = bool(curves.get("kl_visual_update"))
    fig, axes = plt.subplots(2 if has_kl else 1, 1, figsize=(8, 6.5 if has_kl else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    for key, color in (("visual", "tab:red"), ("text", "tab:blue"), ("whole", "tab:gray")):
        if curves.get(key):
            ax.plot(x, _series(curves[key]), marker="o", ms=3, color=color, label=f"{key} TME")
    for lo, hi, label, shade in ((0, l1, "I: alignment", "#f3e9d2"), (l1, l2, "II: aggregation", "#dfeedd"),
                                 (l2, depth, "III: saturation", "#e4e4f3")):
        ax.axvspan(lo, hi, color=shade, alpha=0.6, lw=0)
        ax.text((lo + hi) / 2, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.axvline(l1, color="tab:green", ls="--", label=f"IVR before layer {l1} (keep {schedule['keep_ratio']})")
    ssr = f"SSR {schedule['ssr_mode']} from layer {l2}"
    if schedule.get("ssr_ratio") is not None:
        ssr += f" (keep {schedule['ssr_ratio']})"
    ax.axvline(l2, color="tab:purple", ls="--", label=ssr)
    ax.set_ylabel("truncated matrix entropy H1 (nats)")
    ax.set_title(title, pad=16)
    ax.legend(fontsize=8, loc="best")
    if has_kl:
        ax2 = axes[1][0]
        # the last layer's KL is 0 by construction (its visual updates cannot reach the last token): not drawn
        kl = [v if (v is not None and v > 0) else _NAN for v in curves["kl_visual_update"][:-1]]
        ax2.semilogy(range(depth - 1), kl, marker="s", ms=3, color="tab:orange",
                     label="KL, visual updates zeroed at layer")
        ax2.axvline(l2, color="tab:purple", ls="--")
        ax2.set_ylabel("KL(p_probe || p_full)")
        ax2.legend(fontsize=8)
    axes[-1][0].set_xlabel("layer point (i = input of layer i; last = final output)")
    save_figure(fig, path)
    if curves.get("tower"):
        tower_plot(curves["tower"], curves.get("tower_cut_blocks") or [], title,
                   path.with_name(path.stem + "_tower" + path.suffix))


def tower_plot(tower: list, cut_blocks: list[int], title: str, path: Path) -> None:
    """The vision tower's token TME after each block, the blocks a vision cut may follow marked (beyond the paper:
    where the tower's tokens stop saying new things is where a cut loses least)."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(range(len(tower)), _series(tower), marker="o", ms=3, color="tab:brown", label="tower token TME")
    for i, block in enumerate(cut_blocks):
        ax.axvline(block, color="tab:green", ls=":", label="full-attention block (a cut may follow)" if not i else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("vision tower block (its output)")
    ax.set_ylabel("TME H1 (nats)")
    ax.set_title(title.replace("truncated matrix entropy per layer", "vision tower TME per block"), fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def latency_plot(latency: dict, title: str, path: Path) -> None:
    """Bars: eager vs engine prefill, full vs HalfV, plus the engine decode step."""
    labels = ["eager\nfull", "eager\nHalfV", "engine\nfull", "engine\nHalfV", "engine\ndecode step"]
    keys = ["eager_full_prefill", "eager_halfv_prefill", "engine_full_prefill", "engine_halfv_prefill",
            "engine_decode_step"]
    values = [latency[k] for k in keys]
    colors = ["#9aa5b1", "tab:red", "#6b7a89", "tab:green", "tab:blue"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar(labels, values, color=colors)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.1f}", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("milliseconds (median)")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def accuracy_flops_plot(result: dict, title: str, path: Path) -> None:
    """Accuracy against prefill FLOPs (fraction of the unpruned model) for each method over the keep-ratio sweep;
    the unpruned model's accuracy as a dashed line."""
    styles = {"halfv": ("tab:red", "o"), "ivr": ("tab:green", "s"), "attention": ("tab:blue", "^"),
              "random": ("tab:gray", "x")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(result["points"][0]["methods"]) if result["points"] else []
    for method in methods:
        xs = [p["methods"][method]["flops_fraction"] for p in result["points"]]
        ys = [p["methods"][method]["accuracy"] for p in result["points"]]
        color, marker = styles.get(method, ("k", "."))
        ax.plot(xs, ys, marker=marker, color=color, label=result["points"][0]["methods"][method]["label"])
        if method == "halfv":
            for p, x, y in zip(result["points"], xs, ys):
                ax.annotate(f"ρ={p['keep_ratio']:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=color)
    full = result["full"]["accuracy"]
    if full is not None:
        ax.axhline(full, color="k", ls="--", lw=1, label=f"unpruned ({full:.3f})")
    ax.set_xlabel("LLM prefill FLOPs, fraction of the unpruned model")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def pareto_plot(search: dict, front: list[int], title: str, path: Path) -> None:
    """The schedule search: mean KL to the unpruned model against the FLOPs ratio for every candidate run, the
    Pareto front, the chosen schedule, the reference schedules (paper, rules) and the target ratio."""
    entries = search["log"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    floor = min((e["kl_mean"] for e in entries if e["kl_mean"] > 0), default=1e-12) / 2  # log axis: KL 0 drawn here
    y = lambda e: max(e["kl_mean"], floor)  # noqa: E731
    cands = [e for e in entries if e["role"] == "candidate"]
    ax.scatter([e["ratio"] for e in cands], [y(e) for e in cands], s=10, color="#9aa5b1", label="candidates run")
    ax.plot([entries[i]["ratio"] for i in front], [y(entries[i]) for i in front], color="tab:blue", marker=".",
            label="Pareto front")
    chosen = entries[search["chosen"]]
    ax.scatter([chosen["ratio"]], [y(chosen)], marker="*", s=160, color="tab:red", zorder=5,
               label=f"chosen (ratio {chosen['ratio']:.2f})")
    for e, marker in zip([e for e in entries if e["role"] != "candidate"], "Ds^v"):
        ax.scatter([e["ratio"]], [y(e)], marker=marker, s=50, color="k", zorder=5,
                   label=f"{e['role']} schedule (ratio {e['ratio']:.2f})")
    ax.axvline(search["target_ratio"], color="tab:green", ls="--", label=f"target {search['target_ratio']:g}")
    ax.set_yscale("log")
    ax.set_xlabel(f"{search['ratio_kind']} FLOPs ratio (unpruned / HalfV) at {search['bucket'][0]}x{search['bucket'][1]}")
    ax.set_ylabel("mean KL(p_full || p_halfv), calibration samples")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def kept_tokens_plot(items: list, path: Path, columns: int = 2) -> None:
    """The pages with what HalfV kept drawn over them: dropped visual tokens dimmed, the IVR-kept ones clear, the
    SSR-kept ones (a second top-K, Qwen) outlined in red. items: (image, token boxes, {stage: kept indices},
    title)."""
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = (len(items) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 5.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, boxes, kept, title) in zip(axes.flat, items):
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        dim = np.ones(pixels.shape[:2], dtype=bool)
        ivr = kept.get("ivr", kept.get("cut", []))
        for i in ivr:
            top, left, bottom, right = boxes[int(i)]
            dim[top:bottom, left:right] = False
        pixels[dim] = pixels[dim] * 0.25 + 0.75 * 0.15  # dropped: dark
        ax.imshow(pixels)
        ssr = kept.get("ssr", [])
        for i in ssr if "ivr" in kept and len(ssr) < len(ivr) else []:  # freeze mode keeps the IVR set itself
            top, left, bottom, right = boxes[int(i)]
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor="red",
                                   linewidth=1.2))
        ax.set_title(title, fontsize=8)
    fig.suptitle("visual tokens kept: IVR (clear), SSR top-K (red outline); dropped tokens dimmed", fontsize=9)
    save_figure(fig, path)
