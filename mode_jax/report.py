"""The run's final report: `report.md` + `report.json`, bit maps and figures under the workdir.

Built only from stage artifacts, so it can be regenerated at any time and never holds data the
artifacts do not.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mode_jax import checkpoint
from mode_jax.alloc import bitmap
from mode_jax.calib import frequency
from mode_jax.eval import bootstrap
from mode_jax.quant import apply


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
    """Per-layer Jensen-Shannon divergence (bits) between text and key-vision routing counts."""
    from mode_jax.eval import harness

    return [float(v) for v in harness.routing_divergence(stats["count_text"], stats["count_key"])]


def _meta(workdir: str, stage: str, fingerprint: str) -> dict:
    with open(os.path.join(workdir, stage, fingerprint, checkpoint.META)) as f:
        return json.load(f)["meta"]


def evaluated_runs(workdir: str) -> list[dict]:
    """One row per complete evaluate artifact in `workdir`, with the allocation it came from.

    Follows the recorded inputs evaluate -> quantize -> allocate through each meta.json, so
    results of earlier invocations (other budgets, ablations) land in the same table.
    """
    rows, quantize_configs = [], []
    root = os.path.join(workdir, "evaluate")
    for fp in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not checkpoint.is_complete(os.path.join(root, fp)):
            continue
        ev = _meta(workdir, "evaluate", fp)
        q_fp = ev["recorded_config"]["inputs"]["quantize"]
        q = _meta(workdir, "quantize", q_fp)
        a_fp = q["recorded_config"]["inputs"]["allocate"]
        a = _meta(workdir, "allocate", a_fp)
        alloc = a["recorded_config"]["config"]["alloc"]
        quant = q["recorded_config"]["config"]["quant"]
        sens = _meta(workdir, "sensitivity", a["recorded_config"]["inputs"]["sensitivity"])
        mode = alloc["method"] == "mode"
        label = alloc["method"] + (f"/{alloc['freq_key']}" if mode else "")
        if alloc["method"] == "random":  # one draw of the control among others
            label += f" (seed {alloc.get('random_seed', 0)})"
        if sens["recorded_config"]["config"].get("data.testbed_stats_tasks") == "all":
            label += " (statistics on all tasks)"  # not the reference's vision prompts only
        rows.append({
            "method": label, "allocator": alloc["method"],
            "budget_bits": float(alloc["budget_bits"]),
            "estimator": _sensitivity_label(alloc["method"],
                                            sens["recorded_config"]["config"]["sens"]),
            "candidate_bits": alloc["bits"], "quantizer": quant["method"],
            "router_finetune": bool(quant.get("router_finetune", False)),
            "average_bits": a["summary"]["average_bits"],
            "histogram": a["summary"].get("histogram"),
            "allocate": a_fp, "evaluate": fp, **ev.get("metrics", {}),
            "quantize_notes": apply.notes(q.get("metadata", {}).get("quant_report", {})),
        })
        quantize_configs.append(q["recorded_config"]["config"])
    for row, label in zip(rows, quantizer_labels(quantize_configs), strict=True):
        row["quantizer"] = label
    rows = sorted(rows, key=lambda r: (-r["budget_bits"], r["method"], r["estimator"] or "",
                                       r["quantizer"], r["router_finetune"]))
    return with_intervals(rows, {r["evaluate"]: _per_sample(workdir, r["evaluate"]) for r in rows})


# Round-to-nearest ignores these, the calibration data's settings (data.*) and the seed.
GPTQ_ONLY = ("act_order", "block_size", "damp")


def _quantize_settings(config: dict) -> dict:
    """The quantize stage's recorded config, flat: quant.* by their own names, the rest (data.*,
    seed, ...) as recorded; method and router fine-tuning have their own columns."""
    quant = {k: v for k, v in config.get("quant", {}).items()
             if k not in ("method", "router_finetune")}
    return quant | {k: v for k, v in config.items() if k != "quant"}


def quantizer_labels(configs: list[dict]) -> list[str]:
    """Each row's quant.method plus every quantize-stage setting whose value differs between
    the rows (`act_order=True`, `attention_bits=16`, `data.num_gptq_samples=256`, ...), from
    the recorded configs of their quantize artifacts: quantizer ablations in one workdir are
    told apart, and each method pairs only with the uniform row quantized the same way."""
    flat = [_quantize_settings(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]

    def used(method: str, key: str) -> bool:
        return method == "gptq" or not (key in GPTQ_ONLY or key.startswith("data.")
                                         or key == "seed")

    return [" ".join([c["quant"]["method"], *(f"{k}={f.get(k)}" for k in varying
                                              if used(c["quant"]["method"], k))])
            for c, f in zip(configs, flat, strict=True)]


def _sensitivity_label(method: str, sens: dict) -> str | None:
    """What a row's allocation read from the sensitivity stage: MODE its configured estimator,
    PMQ and GEMQ their own costs; '/gptq' when the expert copies were not round-to-nearest;
    MoPEQ the curvature of its trace (a config may make either the default)."""
    quantizer = sens.get("quantizer", "rtn")  # artifacts older than the option: rtn
    suffix = "" if quantizer == "rtn" else f"/{quantizer}"
    if method == "mode":
        return sens["estimator"] + suffix
    if method.startswith("mopeq"):  # older artifacts: the Hessian
        return f"{sens.get('trace_curvature', 'hessian')} trace"
    return f"own costs{suffix}" if suffix and method in ("pmq", "gemq") else None


def _per_sample(workdir: str, fingerprint: str) -> dict | None:
    """The evaluate artifact's per-sample arrays (None for artifacts written before they were
    kept)."""
    arrays, _ = checkpoint.load(os.path.join(workdir, "evaluate", fingerprint))
    return arrays.get("per_sample")


def _kl(per_sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(summed KL, scored positions) per sample: the ratio metric `bootstrap` resamples."""
    return per_sample["kl"], per_sample["kl_tokens"]


def _pair_key(row: dict) -> tuple:
    return (row["budget_bits"], row["quantizer"], row["router_finetune"], row.get("eval_digest"))


def with_intervals(rows: list[dict], samples: dict, resamples: int = bootstrap.RESAMPLES
                   ) -> list[dict]:
    """Add 95% bootstrap intervals to each row, and a paired comparison with the uniform row of
    the same budget, quantizer and router setting scored on the same samples.

    samples: evaluate fingerprint -> per-sample arrays (`evaluation.evaluate`), or None. Every
    row scored on the same samples uses the same resamples (seed 0), so the comparisons are
    paired. Adds `accuracy_ci`, `kl_ci` ([low, high]) and `vs_uniform` = {accuracy_points,
    kl_ratio: [estimate, low, high], share_kl_lower}.
    """
    weights: dict[str, np.ndarray] = {}
    uniform = {_pair_key(r): r for r in rows  # calibration variants of uniform are the same
               if r["allocator"] == "uniform" and samples.get(r["evaluate"]) is not None}
    for r in rows:
        own = samples.get(r["evaluate"])
        if own is None or "eval_digest" not in r:
            continue
        w = weights.setdefault(r["eval_digest"], bootstrap.draws(len(own["kl"]), resamples))
        kl = _kl(own)
        r["kl_ci"] = bootstrap.interval(*kl, w).as_list()[1:]
        if "correct" in own:
            r["accuracy_ci"] = bootstrap.interval(own["correct"], np.ones(len(own["correct"])),
                                                  w).as_list()[1:]
        ref = uniform.get(_pair_key(r))
        if ref is None or r["allocator"] == "uniform":
            continue
        other = samples[ref["evaluate"]]
        kl_cmp = bootstrap.compare(kl, _kl(other), w)
        r["vs_uniform"] = {"share_kl_lower": kl_cmp["share_a_lower"],
                           "kl_ratio": kl_cmp["ratio"].as_list() if kl_cmp["ratio"] else None}
        for i, family in enumerate(r.get("families", []) if "family" in own else []):
            # the same resamples, counting only this family's samples
            mask = own["family"] == i
            cmp = bootstrap.compare((own["kl"] * mask, own["kl_tokens"] * mask),
                                    (other["kl"] * mask, other["kl_tokens"] * mask), w)
            r["vs_uniform"][f"kl_ratio_{family}"] = (cmp["ratio"].as_list() if cmp["ratio"]
                                                     else None)
        if "correct" in own:
            ones = np.ones(len(own["correct"]))
            acc = bootstrap.compare((own["correct"], ones), (other["correct"], ones), w)
            r["vs_uniform"]["accuracy_points"] = [100 * v for v in acc["difference"].as_list()]
    _against_random(rows, samples, weights)
    return rows


def _against_random(rows: list[dict], samples: dict, weights: dict) -> None:
    """`vs_random` for each informed row that has draws of the random control at its budget,
    quantizer and router setting on the same samples: the KL ratio to each draw (paired), as
    {draws, kl_ratio_range: [lowest, highest estimate], draws_beaten: how many ratios have a
    95% interval below 1, draws_lost: above 1}. Works at budgets uniform cannot meet."""
    draws: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["allocator"] == "random" and samples.get(r["evaluate"]) is not None:
            draws.setdefault(_pair_key(r), []).append(r)
    for r in rows:
        own = samples.get(r["evaluate"])
        refs = draws.get(_pair_key(r), [])
        if own is None or r["allocator"] == "random" or not refs:
            continue
        w = weights[r["eval_digest"]]
        ratios = []
        for ref in refs:
            ratio = bootstrap.compare(_kl(own), _kl(samples[ref["evaluate"]]), w)["ratio"]
            if ratio is not None:
                ratios.append(ratio)
        if ratios:
            r["vs_random"] = {
                "draws": len(ratios),
                "kl_ratio_range": [min(x.estimate for x in ratios),
                                   max(x.estimate for x in ratios)],
                "draws_beaten": sum(x.high < 1 for x in ratios),
                "draws_lost": sum(x.low > 1 for x in ratios),
            }


def markdown_path(workdir: str) -> str:
    return os.path.join(workdir, "report.md")


def write(workdir: str, config, contexts: list) -> str:
    """Report every evaluated method/budget in `workdir`; bit maps of this invocation's runs."""
    fig_dir = os.path.join(workdir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    for ctx in contexts:
        alloc = ctx.ensure("allocate")
        a = ctx.config.alloc
        bitmap.save(os.path.join(workdir, "bitmaps", f"{a.method}-{a.freq_key}-{a.budget_bits:g}"),
                    alloc.arrays["bits"], candidate_bits=tuple(a.bits),
                    report=alloc.meta.get("report"))
    rows = evaluated_runs(workdir)
    calibrate = contexts[0].ensure("calibrate")
    stats = calibrate.arrays
    doc = {"config": config.to_dict(), "results": rows,
           "modality_js_divergence_per_layer": modality_divergence(stats),
           "modality_js_divergence_source": _statistics_source(calibrate, workdir)}
    _figure_frequencies(stats, os.path.join(fig_dir, "modality_frequency.png"))
    if any(r.get("accuracy") is not None for r in rows):
        _figure_accuracy(rows, os.path.join(fig_dir, "accuracy_vs_bits.png"))
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    path = markdown_path(workdir)
    with open(path, "w") as f:
        f.write(_markdown(doc))
    return path


def _statistics_source(calibrate, workdir: str) -> str:
    """Which statistics the divergence line reads: the rows may come from runs with other data
    settings on the same workdir, the divergence only from the run that wrote the report."""
    data = calibrate.meta.get("recorded_config", {}).get("config", {})
    keys = ["data.source", "data.num_freq_samples"]
    if data.get("data.source") == "testbed":
        keys.insert(1, "data.testbed_stats_tasks")
    settings = ", ".join(f"{k.split('.')[-1]} {data[k]}" for k in keys if k in data)
    where = os.path.relpath(calibrate.path, workdir)
    return f"{where} ({settings})" if settings else where


def _json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _markdown(doc: dict) -> str:
    rows = doc["results"]
    metric_keys = [k for k in ("accuracy", "accuracy_vision", "accuracy_text", "kl", "perplexity",
                               "model_bytes") if any(k in r for r in rows)]
    ci_keys = [k for k in ("accuracy_ci", "kl_ci") if any(k in r for r in rows)]
    head = ["method", "sensitivity", "quantizer", "router ft", "budget", "avg bits", *metric_keys,
            *(f"{k[:-3]} 95% CI" for k in ci_keys)]
    lines = ["# mode-jax report", "", *_md_head(head)]
    for r in rows:
        cells = [r["method"], r.get("estimator") or "-", r["quantizer"],
                 "yes" if r.get("router_finetune") else "no",
                 f"{r['budget_bits']:g}",
                 f"{r.get('average_bits', float('nan')):.3f}"]
        cells += [_fmt(r.get(k)) for k in metric_keys]
        cells += [_fmt_range(r.get(k)) for k in ci_keys]
        lines.append(_md_row(cells))
    lines += _paired_table(rows)
    lines += _random_table(rows)
    lines += _notes(rows)
    if "modality_js_divergence_per_layer" in doc:
        js = ", ".join(f"{v:.3f}" for v in doc["modality_js_divergence_per_layer"])
        source = doc.get("modality_js_divergence_source")
        of = f"; on the latest run's statistics, {source}" if source else ""
        lines += ["", f"Text vs key-vision routing divergence per MoE layer (JS, bits): {js}{of}"]
    fp = next((r for r in rows if "fp_accuracy" in r), None)
    if fp:
        fams = ", ".join(f"{k[12:]} {v:.4g}" for k, v in fp.items() if k.startswith("fp_accuracy_"))
        lines += ["", f"Full precision: accuracy {fp['fp_accuracy']:.4g} ({fams})"]
    lines += ["", "Figures: figures/*.png; bit maps: bitmaps/<method>-<key>-<budget>/", ""]
    return "\n".join(lines)


def _notes(rows: list[dict]) -> list[str]:
    """The quantize stage's notes (apply.notes), each once, with the rows it concerns."""
    where: dict[str, list[str]] = {}
    for r in rows:
        for note in r.get("quantize_notes") or []:
            where.setdefault(note, []).append(
                f"{r['method']} at {r['budget_bits']:g} bits, {r['quantizer']}")
    if not where:
        return []
    lines = ["", "Quantization notes (each quantize artifact's `quant_report` has the details):",
             ""]
    for note, names in where.items():
        rows_said = "every row" if len(names) == len(rows) else "; ".join(names)
        lines.append(f"- {note} ({rows_said})")
    return lines


def _paired_table(rows: list[dict]) -> list[str]:
    """Each method against uniform at the same budget, on the same samples (paired bootstrap)."""
    paired = [r for r in rows if "vs_uniform" in r]
    if not paired:
        return []
    n = paired[0].get("n")
    families = sorted({k[9:] for r in paired for k in r["vs_uniform"] if k.startswith("kl_ratio_")})
    head = ["method", "sensitivity", "quantizer", "budget", "accuracy - uniform (points)",
            "KL / uniform KL", *(f"{f} KL / uniform's" for f in families),
            "resamples with lower KL"]
    lines = ["", f"Against uniform at the same budget and quantizer, paired over the same {n} "
             "samples (estimate [95% bootstrap interval]; an interval that holds 0 points, or "
             "a KL ratio of 1, is no evidence of a difference):", "", *_md_head(head)]
    for r in paired:
        vs = r["vs_uniform"]
        acc = vs.get("accuracy_points")
        cells = [r["method"], r.get("estimator") or "-", r["quantizer"], _budget_cell(r),
                 "-" if acc is None else f"{acc[0]:+.1f} [{acc[1]:+.1f}, {acc[2]:+.1f}]",
                 _fmt_ratio(vs.get("kl_ratio")),
                 *(_fmt_ratio(vs.get(f"kl_ratio_{f}")) for f in families),
                 f"{100 * vs['share_kl_lower']:.0f}%"]
        lines.append(_md_row(cells))
    return lines


def _random_table(rows: list[dict]) -> list[str]:
    """Each informed method against the draws of the random control at its budget."""
    compared = [r for r in rows if "vs_random" in r]
    if not compared:
        return []
    head = ["method", "sensitivity", "quantizer", "budget", "random draws",
            "KL / draw's KL (lowest-highest)", "draws beaten", "draws lost"]
    lines = ["", "Against the random control (`random`: the same ILP and budget on seeded random "
             "importances), paired per draw; a draw is beaten (lost) when the KL ratio's 95% "
             "interval lies below (above) 1:", "", *_md_head(head)]
    for r in compared:
        vs = r["vs_random"]
        low, high = vs["kl_ratio_range"]
        lines.append(_md_row([
            r["method"], r.get("estimator") or "-", r["quantizer"], _budget_cell(r),
            str(vs["draws"]), f"{low:.2f}-{high:.2f}", str(vs["draws_beaten"]),
            str(vs["draws_lost"])]))
    return lines


def _md_head(head: list[str]) -> list[str]:
    return [_md_row(head), "|" + "---|" * len(head)]


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _budget_cell(r: dict) -> str:
    """The budget, and the average where it differs (MoPEQ's k-means ignores budgets)."""
    budget = f"{r['budget_bits']:g}"
    if abs(r["average_bits"] - r["budget_bits"]) > 1e-6:
        budget += f" (average {r['average_bits']:.3g})"
    return budget


def _fmt_ratio(v) -> str:
    return "-" if v is None else f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def _fmt_range(v) -> str:
    return "-" if v is None else f"[{v[0]:.4g}, {v[1]:.4g}]"


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
