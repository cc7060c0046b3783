"""The testbed's model card: what it is, how it was trained, and whether it judges quantization.

    python -m mode_jax.testbed.card --checkpoint checkpoints/testbed [--samples 1000]

Scores the checkpoint on the held-out split (full precision; uniform round-to-nearest on every
routed expert at 1, 2, 3 and 4 bits, and the same on the trained weights where outlier channels
were folded in after training; the routed, the shared or both kinds of experts switched off;
routing divergence between text and image tokens) and writes
`MODEL_CARD.md` next to the weights. The training script calls `write` at the end of a run, so a
retrained checkpoint always carries its own card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import mode_jax
from mode_jax.eval import harness
from mode_jax.preprocess import ImageConfig
from mode_jax.quant import fake
from mode_jax.testbed import outliers, tasks
from mode_jax.testbed import tokenizer as tok_lib

TRAIN_COMMAND = "python -m mode_jax.testbed.train --out checkpoints/testbed"


def train_command(train_config: dict) -> str:
    """The train.py command of a recorded `train_config` (train_summary.json)."""
    from mode_jax.testbed import train  # train imports this module

    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    if set(train_config) != fields:  # recorded by an older train.py
        return TRAIN_COMMAND + "  (older recipe: see train_summary.json for its settings)"
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in train_config.items()}
    return train.command_line(train.TrainConfig(**cfg))


def heldout(checkpoint: Path, samples: int, seed: int = 0):
    """(model, encoded held-out split) for a checkpoint in the published layout; the card uses
    seed 0, other seeds draw further held-out samples."""
    return mode_jax.load(checkpoint), heldout_data(checkpoint, samples, seed)


def heldout_data(checkpoint: Path, samples: int, seed: int = 0):
    """The encoded held-out split alone (further draws score one loaded model)."""
    tokenizer = tok_lib.load_tokenizer(checkpoint)
    image_cfg = ImageConfig.from_preprocessor_config(
        json.loads((checkpoint / "preprocessor_config.json").read_text()))
    data = tasks.generate("heldout", samples, seed=seed,
                          config=tasks.recorded_config(checkpoint))
    return harness.encode(data, tokenizer, image_cfg)


def rtn_sweep(model, data, full: dict, bits=(1, 2, 3, 4), group_size: int = 128,
              keep_logprobs: bool = False) -> list[dict]:
    """Per bit-width: accuracy (%) per family and overall, drop vs `full` in points, KL."""
    return [{"bits": b, **against(full, fake.fake_quantize(model, fake.uniform_bits(model, b),
                                                            group_size), data, keep_logprobs)}
            for b in bits]


PARTS = ("routed", "shared", "routed+shared")


def without(model, part: str):
    """A copy of `model` with every MoE layer's routed ("routed"), shared ("shared") or both
    kinds of experts ("routed+shared") switched off (their down projections zeroed); `model` is
    left as it was. The card uses it to show where the skills live: a testbed whose routed
    experts can be removed at little cost cannot judge an expert bit allocation."""
    return scaled(model, part, 0.0)


def scaled(model, part: str, factor: float):
    """A copy of `model` whose experts of kind `part` (as in `without`) write `factor` times
    their output: the perturbation of an expert's output along itself, to set beside
    quantization noise of the same relative size."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    new = fake.editable_copy(model)
    for down in down_projections(new, tuple(part.split("+"))):
        down.set_value(down.get_value() * jnp.asarray(factor, down.get_value().dtype))
    return new


def down_projections(model, parts=("dense", "shared", "routed")) -> list:
    """The down-projection Params of the language model's MLPs of the kinds in `parts`: what
    writes an MLP's output to the residual stream (zeroed to switch one off)."""
    out = []
    for layer in model.language_model.layers:
        if not layer.is_moe:
            out += [layer.mlp.down_proj.kernel] if "dense" in parts else []
            continue
        if "routed" in parts:
            out.append(layer.mlp.experts.down)
        if "shared" in parts and layer.mlp.shared_experts is not None:
            out.append(layer.mlp.shared_experts.down_proj.kernel)
    return out


def ablations(model, data, full: dict) -> list[dict]:
    """Accuracy (%), drop in points and KL with the routed, the shared or both removed."""
    return [{"removed": part, **against(full, without(model, part), data)} for part in PARTS]


def against(full: dict, candidate, data, keep_logprobs: bool = False) -> dict:
    """Accuracy (%) per family and overall of `candidate`, drop vs `full` in points, KL to it,
    the evaluation's wall time, and its answer log-probs if asked for."""
    res = harness.evaluate(candidate, data, reference=full, keep_logprobs=keep_logprobs)
    fp, acc = _accuracy(full), _accuracy(res)
    row = {"accuracy": acc, "drop": {k: acc[k] - fp[k] for k in acc}, "kl": res["kl"]["all"],
           "seconds": res["wall_seconds"]}
    if keep_logprobs:
        row["answer_logprobs"] = res["answer_logprobs"]
    return row


def _row(label, row: dict, columns) -> str:
    """A table row: `label`, then "accuracy (drop)" per column, then KL."""
    cells = [f"{row['accuracy'][c]:.1f} ({row['drop'][c]:+.1f})" for c in columns]
    return f"| {label} | " + " | ".join(cells) + f" | {row['kl']:.4f} |"


def _accuracy(result: dict) -> dict[str, float]:
    return {**{f: 100 * v for f, v in result["accuracy"]["family"].items()},
            "all": 100 * result["accuracy"]["all"]}


def _limits(full: dict, sweep: list[dict], removed: list[dict]) -> list[str]:
    """What this checkpoint cannot show, read off its own figures (the targets are those a
    testbed must meet to judge allocations: >= 95% per family, >= 10 points lost at 2 bits)."""
    weak = {t: 100 * v for t, v in full["accuracy"]["task"].items() if v < 0.5}
    two = next((r for r in sweep if r["bits"] == 2), None)
    drops = {r["removed"]: -r["drop"]["all"] for r in removed}
    routed = next((r for r in removed if r["removed"] == "routed"), None)
    lines = []
    low = [f for f, v in full["accuracy"]["family"].items() if v < 0.95]
    if low:
        lines.append(f"- Below the 95% target: {', '.join(low)}.")
    if weak:
        lines.append("- Not learned (under 50%, near the 25% of a 4-way guess): "
                     + ", ".join(f"{t} {v:.0f}%" for t, v in weak.items()) + ".")
    if two is not None and -two["drop"]["all"] < 10:
        text = (f"- Uniform 2-bit round-to-nearest costs {0.0 - two['drop']['all']:.1f} points "
                f"(KL {two['kl']:.4f}), short of the 10-point target")
        if routed is not None:
            text += (f"; switching every routed expert off costs {0.0 - routed['drop']['all']:.1f} "
                     f"(KL {routed['kl']:.4f})")
        lines.append(text + ".")
    if set(drops) == set(PARTS) and drops["routed+shared"] > 2 * (drops["routed"]
                                                                   + drops["shared"]):
        lines.append(f"- The routed and the shared experts hold the skills twice over: either "
                     f"kind alone off costs {drops['routed']:.1f} or {drops['shared']:.1f} "
                     f"points, both off {drops['routed+shared']:.1f}, so noise in one kind is "
                     f"covered by the other.")
    return ["", "## Known limits", "", *lines] if lines else []


def _position_example(form: str) -> str:
    question, answer = tasks.position_question(form, tasks.Shape("circle", "red", 60, 100, 12),
                                               tasks.Shape("square", "blue", 200, 100, 12))
    return f"{question} -> {answer}"


def _relation_note(cfg: dict) -> str:
    share = cfg.get("warmup_relation_share", 0.0)
    if not share:
        return ""
    return (f"; {100 * share:.0f}% of its scenes hold two objects whose cells are also labelled "
            "with where their object lies relative to the other")


def _small_text_note(cfg: dict) -> str:
    small = cfg.get("batch_text_small", cfg["batch_text"])
    return "" if small == cfg["batch_text"] else f" ({small} text on the small scenes)"


def _min_objects_note(cfg: dict) -> list[str]:
    fewest = cfg.get("train_min_objects", 1)
    if fewest == 1:
        return []
    return [f"Full-size training scenes of colour, shape and choice questions hold {fewest} or",
            "more objects (the small-scene phase and the held-out ones 1 or more): a lone object",
            "asks for no look-up."]


def _fold_note(fold: outliers.Fold, trained_sweep: list[dict], families) -> list[str]:
    """What the folded outlier channels add, beside the same sweep on the trained weights."""
    if fold.empty:
        return []
    lines = [
        "",
        f"The weights carry outlier channels folded in after training (`outliers.py`): "
        f"{fold.hidden} hidden",
        f"channels per MoE layer and {fold.intermediate} intermediate channels per routed "
        f"expert, {fold.factor:g}x larger,",
        "with the matching norm scales and up columns divided by as much. Real LLM weights "
        "are",
        "heavy-tailed in this way; the trained ones here are near Gaussian. The function is",
        "unchanged (bit for bit with a power-of-two factor), so every accuracy above is the",
        "trained model's; only quantization sees the difference. The same sweep on the trained",
        "weights, the fold undone:",
    ]
    if trained_sweep:
        lines += ["", "| bits | " + " | ".join(families) + " | all | KL |",
                  "| --- |" + " --- |" * (len(families) + 2)]
        lines += [_row(row["bits"], row, [*families, "all"]) for row in trained_sweep]
    return lines


def render(summary: dict, scene: tasks.TaskConfig, full: dict, sweep: list[dict],
           divergence: np.ndarray, moe_layers, size_bytes: int,
           removed: list[dict] = (), trained_sweep: list[dict] = ()) -> str:
    """MODEL_CARD.md text from the training summary and the evaluations above."""
    cfg = summary["train_config"]
    acc = full["accuracy"]
    lines = [
        "# mode-jax testbed: a small trained Kimi-VL",
        "",
        "A Kimi-VL-architecture model (MoonViT vision tower, patch-merger projector, DeepSeek-V3",
        "MoE language model with MLA, a dense first layer, one shared expert and 16 routed experts",
        "with top-2 sigmoid routing) trained from scratch on the synthetic task suite",
        "`mode_jax/testbed/tasks.py`. Its job is to tell good expert bit allocations from bad",
        "ones: its experts hold the skills (facts, arithmetic, reading scenes) that quantization",
        "can destroy. It is a toy: 1,000x smaller than Kimi-VL-A3B, and not a language model.",
        "",
        "## Size and layout",
        f"- {summary['parameters']:,} parameters, float32; {size_bytes / 2**20:.1f} MiB on disk.",
        "- The published Kimi-VL layout (`config.json`, `model.safetensors`, `tokenizer.json`,",
        "  `preprocessor_config.json`), read by `mode_jax.load` like a real checkpoint.",
        "- Word-level tokenizer (`tokenizers` WordLevel, saved as `tokenizer.json`).",
        "",
        "## Data",
        "Fresh samples every step from `tasks.generate('train', ...)`; the held-out split never",
        "overlaps it (vision: hashed scene + question; text: held-out question phrasings).",
        f"- vision ({', '.join(tasks.VISION_TASKS)}): {scene.image_size[0]} x "
        f"{scene.image_size[1]} scenes of 1 to {scene.max_objects} objects ({len(tasks.SHAPES)}",
        f"  shapes, {len(tasks.COLORS)} colours, half-size {scene.object_size[0]}-"
        f"{scene.object_size[1]} px, each alone in a {scene.cell}-pixel cell, i.e. one merged",
        "  image token) on a faint textured background: all but a few of the 144 image tokens",
        "  of a prompt are redundant.",
        f"- Relative position is asked as {_position_example(scene.position_form)!r}.",
        f"- text ({', '.join(tasks.TEXT_TASKS)}).",
        f"- Multiple choice (choice, fact_choice) lists four options, answered by the "
        f"{scene.choice_answer}.",
        "",
        "## Training",
        f"    {train_command(cfg)}",
        "",
        f"Seed {cfg['seed']}; a dense-label vision warm-up of {cfg['vision_warmup_steps']} steps",
        f"(`vision_warmup.py`{_relation_note(cfg)}), then {cfg['steps']} AdamW steps of "
        f"{cfg['batch_vision']} vision +",
        f"{cfg['batch_text']} text samples{_small_text_note(cfg)} with DeepSeek-V3's bias "
        "balancing; "
        f"{summary['train_seconds'] / 60:.1f} minutes on the machine that made it",
        "(2 CPU cores). Every setting is in `train_summary.json`.",
        *_min_objects_note(cfg),
        "",
        f"## Held-out accuracy ({full['n']} samples, greedy decoding, exact match)",
        "",
        "| group | exact match % |",
        "| --- | --- |",
        f"| all | {100 * acc['all']:.1f} |",
    ]
    for group in ("family", "task", "modality"):
        for name, v in acc[group].items():
            lines.append(f"| {group} {name} | {100 * v:.1f} |")
    families = sorted(acc["family"])
    lines += [
        "",
        f"Evaluation took {full['wall_seconds']:.0f} s on CPU (compilation included).",
        "",
        "## Does it judge quantization?",
        "Uniform round-to-nearest (symmetric, group 128) on every routed expert, the rest in",
        "float32. Accuracy in %, drop from full precision in points:",
        "",
        "| bits | " + " | ".join(families) + " | all | KL |",
        "| --- |" + " --- |" * (len(families) + 2),
        "| 32 | " + " | ".join(f"{_accuracy(full)[f]:.1f}" for f in [*families, "all"])
        + " | 0 |",
    ]
    lines += [_row(row["bits"], row, [*families, "all"]) for row in sweep]
    lines += _fold_note(outliers.from_summary(summary), trained_sweep, families)
    if removed:
        lines += ["", "With the routed, the shared or both kinds of experts of every MoE layer "
                  "off:", ""]
        lines += ["| removed | " + " | ".join(families) + " | all | KL |",
                  "| --- |" + " --- |" * (len(families) + 2)]
        lines += [_row(row["removed"], row, [*families, "all"]) for row in removed]
    lines += [
        "",
        "## Text and image tokens prefer different experts",
        "Jensen-Shannon divergence (bits, 0..1) between the expert frequencies of text and image",
        "tokens on the held-out split, per MoE layer:",
        "",
        "| layer | JS divergence |",
        "| --- | --- |",
    ]
    lines += [f"| {layer} | {js:.3f} |" for layer, js in zip(moe_layers, divergence, strict=True)]
    lines += _limits(full, sweep, removed)
    lines += ["", "Reproduce: `python -m mode_jax.testbed.card --checkpoint <dir>`.", ""]
    return "\n".join(lines)


def write(checkpoint: str | Path, samples: int = 1000, log=print) -> dict:
    """Evaluate `checkpoint`, write its MODEL_CARD.md and the same figures into its
    train_summary.json (so the two never disagree after a rerun); returns the figures."""
    checkpoint = Path(checkpoint)
    summary = json.loads((checkpoint / "train_summary.json").read_text())
    model, data = heldout(checkpoint, samples)
    full = harness.evaluate(model, data, routing=True)
    log(harness.format_table(full, f"full precision, {checkpoint}"))
    sweep = rtn_sweep(model, data, full)
    fold = outliers.from_summary(summary)
    trained = ([] if fold.empty else
               rtn_sweep(outliers.apply(model, fold, inverse=True), data, full))
    removed = ablations(model, data, full)
    divergence = harness.routing_divergence(full["routing"]["text"], full["routing"]["image"])
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    text = render(summary, tasks.recorded_config(checkpoint), full, sweep, divergence,
                  model.config.text.moe_layers, size, removed, trained)
    (checkpoint / "MODEL_CARD.md").write_text(text)
    log(text)
    figures = {"heldout": harness.summary(full), "rtn": sweep, "rtn_trained": trained,
               "removed": removed,
               "divergence": divergence.tolist()}
    summary |= figures
    (checkpoint / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/testbed")
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    write(args.checkpoint, args.samples)


if __name__ == "__main__":
    main()
