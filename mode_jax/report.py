"""The run's final report: `report.md` + `report.json`, bit maps and figures under the workdir.

Built only from stage artifacts, so it can be regenerated at any time and never holds data the
artifacts do not.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mode_jax.alloc import bitmap
from mode_jax.calib import frequency


def _figure_frequencies(stats: dict, path: str) -> None:
    """Per MoE layer, text vs key-vision routing frequency over experts (two heat maps)."""
    from matplotlib.figure import Figure

    f_text = frequency.normalized_frequency(stats["count_text"])
    f_key = frequency.normalized_frequency(stats["count_key"])
    fig = Figure(figsize=(10, 3 + 0.15 * f_text.shape[0]))
    for ax, f, title in zip(fig.subplots(1, 2), (f_text, f_key),
                            ("text tokens", "key vision tokens"), strict=True):
        im = ax.imshow(f, aspect="auto", cmap="viridis")
        ax.set(title=title, xlabel="expert", ylabel="MoE layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _figure_accuracy(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["average_bits"], r["accuracy"]) for r in rows
                     if r["method"] == method and r.get("accuracy") is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set(xlabel="average bits per routed expert", ylabel="accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def modality_divergence(stats: dict) -> list[float]:
    """Per-layer Jensen-Shannon divergence (bits) between text and key-vision frequencies."""
    p = frequency.normalized_frequency(stats["count_text"])
    q = frequency.normalized_frequency(stats["count_key"])
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0)

    return [float(v) for v in 0.5 * (kl(p, m).sum(-1) + kl(q, m).sum(-1))]


def write(workdir: str, config, contexts: list, final_stage: str) -> str:
    """contexts: one runner.Context per method, its stages up to `final_stage` complete."""
    fig_dir = os.path.join(workdir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    rows = []
    for ctx in contexts:
        method = ctx.config.alloc.method
        alloc = ctx.ensure("allocate")
        summary = bitmap.summary(alloc.arrays["bits"])
        row = {"method": method, "budget_bits": float(config.alloc.budget_bits),
               "average_bits": summary["average_bits"], "histogram": summary.get("histogram"),
               "artifact": os.path.relpath(ctx.path(final_stage), workdir)}
        bitmap.save(os.path.join(workdir, "bitmaps", f"{method}-{config.alloc.budget_bits:g}"),
                    alloc.arrays["bits"], candidate_bits=tuple(config.alloc.bits),
                    report=alloc.meta.get("report"))
        if final_stage == "evaluate":
            row.update(ctx.ensure("evaluate").meta.get("metrics", {}))
        rows.append(row)
    stats = contexts[0].ensure("calibrate").arrays
    doc = {"config": config.to_dict(), "results": rows}
    if stats is not None:
        doc["modality_js_divergence_per_layer"] = modality_divergence(stats)
        _figure_frequencies(stats, os.path.join(fig_dir, "modality_frequency.png"))
    if any(r.get("accuracy") is not None for r in rows):
        _figure_accuracy(rows, os.path.join(fig_dir, "accuracy_vs_bits.png"))
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write(_markdown(doc))
    return path


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _markdown(doc: dict) -> str:
    rows = doc["results"]
    metric_keys = [k for k in ("accuracy", "accuracy_vision", "accuracy_text", "kl", "perplexity",
                               "model_bytes") if any(k in r for r in rows)]
    head = ["method", "budget", "avg bits", *metric_keys]
    lines = ["# mode-jax report", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['budget_bits']:g}", f"{r.get('average_bits', float('nan')):.3f}"]
        cells += [_fmt(r.get(k)) for k in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    if "modality_js_divergence_per_layer" in doc:
        js = ", ".join(f"{v:.3f}" for v in doc["modality_js_divergence_per_layer"])
        lines += ["", f"Text vs key-vision routing divergence per MoE layer (JS, bits): {js}"]
    lines += ["", "Figures: figures/*.png; bit maps: bitmaps/<method>-<budget>/", ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
