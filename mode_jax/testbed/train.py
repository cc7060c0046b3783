"""Train the testbed: a small Kimi-VL (MoonViT + projector + DeepSeek-V3 MoE LM) on the task suite.

    python -m mode_jax.testbed.train --out checkpoints/testbed

Fixed seed; every step draws fresh training samples (`tasks.generate("train", ...)`): a batch of
vision questions and a batch of text questions, run as two forward passes (a text prompt is
~25 tokens, a vision prompt ~170) whose losses are averaged. The loss is the cross-entropy of
the answer tokens (and the closing `<|im_end|>`) plus `context_weight` times that of the other
text tokens (`answer_loss`); image placeholders carry none. Vision rows add `lookup_weight`
times `lookup_loss`, which points one head's worth of a layer's attention at the object the
question names. The run computes with `portable_math.py`'s XLA flags (set before JAX starts), so
its bits do not depend on which x86-64 CPU runs it.

Load balancing is DeepSeek-V3's auxiliary-loss-free rule: after each step every MoE layer's
`e_score_correction_bias` moves by `gamma * sign(mean count - count_e)` (counts of real tokens
routed to expert e in that step); the bias is excluded from the optimizer (and so from weight
decay). Routed experts train through a capacity dispatch (`CapacityExperts`: each expert takes
at most `capacity` token slots, the rest are dropped for that step), which on CPU costs a third
of computing every expert for every token; evaluation uses the model's own exact (`sorted`)
path. The run ends by folding outlier channels into the routed experts (`outliers.py`:
the same function, weights that quantize like a real model's) and writing the checkpoint in the
published Kimi-VL layout (`mode_jax.convert.export`); then `card.write` reloads it with
`mode_jax.load`, scores the held-out split with the evaluation harness and writes MODEL_CARD.md
(figures also in `train_summary.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mode_jax.convert import export
from mode_jax.models.deepseek_v3 import TextConfig
from mode_jax.models.kimivl import KimiVL, KimiVLConfig
from mode_jax.models.moonvit import VisionConfig
from mode_jax.preprocess import ImageConfig, preprocess_images
from mode_jax.testbed import card, outliers, portable_math, tasks, vision_warmup
from mode_jax.testbed import tokenizer as tok_lib

# Shares of the sub-tasks per batch (a repeat doubles a share). With the warm-up's relation
# labels, relative position in the 'subject' form is a look-up like colour (100% held-out with a
# 3/8 share), while shape fell to 61% next to it; shape and counting get 2/7 each here.
TEXT_MIX = tasks.TEXT_TASKS
VISION_MIX = ("color", "shape", "shape", "count", "count", "position", "choice")
LAYERS = 4  # language-model decoder layers (model_config)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings (the defaults are the testbed recipe)."""

    steps: int = 2200
    # Full-size phase: fewer text samples than the small-scene phase (text is learned there,
    # `batch_text_small`) and more vision ones, at about the same cost per step.
    batch_vision: int = 32
    batch_text: int = 24
    # Curriculum: the first `small_image_steps` steps use `small_image_size` scenes (36 image
    # tokens, not 144) in batches of `batch_vision_small`: with 3 objects among 144 tokens an
    # untrained attention head sees ~2% object signal, and question-to-object retrieval is slow
    # to start; learned on small scenes it carries over (the vision warm-up sees both sizes).
    small_image_steps: int = 1100
    small_image_size: tuple[int, int] = (168, 168)
    batch_vision_small: int = 48
    batch_text_small: int = 48  # text samples per step of the small-scene phase
    vision_warmup_steps: int = 800  # dense-label pretraining of MoonViT (vision_warmup.py)
    vision_warmup_batch: int = 16
    vision_warmup_lr: float = 3e-3
    # Share of warm-up scenes with two objects whose cells are also labelled with where their
    # object lies relative to the other (vision_warmup.py); 0 leaves the relation head out.
    warmup_relation_share: float = 0.35
    freeze_vision: bool = True  # keep the warmed-up MoonViT fixed in the MLLM stage
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    bias_gamma: float = 1e-2  # noaux_tc bias step per training step
    capacity_factor: float = 2.0  # expert slots = factor * tokens * k / E
    seed: int = 0
    probe_samples: int = 128  # held-out rows per family scored during training
    eval_samples: int = 1000  # held-out samples scored by the harness at the end
    log_every: int = 50
    context_weight: float = 0.5  # weight of the loss on question/template tokens
    pos_emb_init: float = 0.02  # scale of the N(0, 1) vision position table at init
    # Start every language-model MLP's down projection (dense, shared, routed) at zero, so what
    # an expert writes to the residual stream is all learned rather than a learned delta on a
    # random map (a 500-step probe: held-out vision 45% vs 37% with LeCun-initialised downs).
    zero_init_down: bool = True
    position_form: str = "subject"  # how position questions are asked (tasks.TaskConfig)
    attention_heads: int = 4  # of the language model (model_config)
    head_dim: int = 32  # its query-key (no-rope part) and value width per head
    # Vision sub-task shares per batch on full-size and on small (curriculum) scenes.
    vision_mix: tuple[str, ...] = VISION_MIX
    vision_mix_small: tuple[str, ...] = VISION_MIX
    # Fewest objects in a full-size training scene of a colour, shape or choice question (the
    # small-scene phase and the held-out split keep the suite's 1..max_objects): one-object
    # scenes teach no look-up, and looking up an object by its colour is the skill the LM learns
    # last (README, "testbed"). Applied to both phases, 2 stopped the look-up from being learned
    # at all; on the full-size phase only, 3 (every such scene at the suite's most) gave the
    # shipped checkpoint, 1.4 points of held-out vision over 1.
    train_min_objects: int = 3
    # Outlier channels folded into the routed experts before export (`outliers.py`): the same
    # function bit for bit, but a few channels set each quantization group's scale, as in real
    # LLM weights; trained as is, 2-bit round-to-nearest cost the testbed nothing (the card
    # gives both). 0 or factor 1 exports the trained weights unchanged.
    outlier_hidden: int = 8
    outlier_intermediate: int = 8
    outlier_factor: float = 8.0
    # Probability that a training row runs without the shared experts (whole rows, inverted
    # scaling as in dropout; none at inference): the routed experts then have to hold every
    # skill on their own rather than share it with an always-on expert, so quantizing them
    # costs what it would in a real model: 2-bit round-to-nearest costs the shipped checkpoint
    # 12.9 points, 6.9 without dropout. Without the look-up aid it cost vision (90.4%); the
    # runs are in docs/testbed.md.
    shared_dropout: float = 0.25
    # Run XLA:CPU with the flags of `portable_math.py` (no run-time-dispatched YNNPACK kernels,
    # generated code capped at AVX2), so the run computes the same bits on any x86-64 machine
    # with AVX2 and the same core count, not only on the machine kind that made it. The shipped
    # checkpoint was made so; in-process callers whose JAX already runs pass False.
    portable_math: bool = True
    # Look-up aid: weight of a loss on one language-model layer's attention from the position
    # that predicts the answer, asking at least one head's worth of it (1 / heads of the
    # head-mean) to fall on the image tokens of the object the question names (`tasks.Sample.
    # target_cells`). Finding "the red object" among the image tokens is the skill the recipe
    # learns last and least reliably (docs/testbed.md); this gives it a direct signal. 0: off.
    # At 0.2 (shared dropout 0) the previous checkpoint reached 96.8% held-out vision
    # (portable, without it: 0.17 more nats of vision loss at step 1100, stopped); 1.0 crowds
    # out the answer loss.
    lookup_weight: float = 0.2
    lookup_layer: int = 1  # layer 0 cannot look up: its query has not yet read the question

    def __post_init__(self):
        for name in ("vision_mix", "vision_mix_small"):
            mix = getattr(self, name)
            unknown = sorted(set(mix) - set(tasks.VISION_TASKS))
            if not mix or unknown:
                raise ValueError(f"{name}={mix}: needs one or more of {tasks.VISION_TASKS}"
                                 + (f"; unknown {unknown}" if unknown else ""))
        most = tasks.TaskConfig().max_objects
        if not 1 <= self.train_min_objects <= most:
            raise ValueError(f"train_min_objects={self.train_min_objects}: must be in 1..{most} "
                             "(the suite's max_objects)")
        if self.lookup_weight < 0 or not 1 <= self.lookup_layer < LAYERS:
            raise ValueError(f"lookup_weight={self.lookup_weight} must be >= 0 and "
                             f"lookup_layer={self.lookup_layer} in 1..{LAYERS - 1}")
        if not 0 <= self.shared_dropout < 1:
            raise ValueError(f"shared_dropout={self.shared_dropout}: must be in [0, 1)")
        if not self.outlier_factor > 0:
            raise ValueError(f"outlier_factor={self.outlier_factor}: must be positive")
        # Refused here, not at export 40 minutes later.
        text = model_config(attention_heads=self.attention_heads, head_dim=self.head_dim).text
        for name, width in (("outlier_hidden", text.hidden_size),
                            ("outlier_intermediate", text.moe_intermediate_size)):
            if not 0 <= getattr(self, name) <= width:
                raise ValueError(f"{name}={getattr(self, name)}: must be in 0..{width}")

    def fold(self) -> outliers.Fold:
        return outliers.from_train_config(dataclasses.asdict(self))

    def task_config(self, family_tasks: tuple[str, ...] = tasks.ALL_TASKS) -> tasks.TaskConfig:
        """The task suite's default settings (`family_tasks` picks the mix; a repeat doubles a
        share). The checkpoint records them in train_summary.json ("task_config")."""
        return tasks.TaskConfig(tasks=family_tasks, position_form=self.position_form)

    def small_task_config(self, family_tasks: tuple[str, ...] = tasks.ALL_TASKS
                          ) -> tasks.TaskConfig:
        """The curriculum's small scenes."""
        return tasks.TaskConfig(tasks=family_tasks, image_size=self.small_image_size,
                                position_form=self.position_form)

    def training_configs(self) -> dict[str, tasks.TaskConfig]:
        """The generator settings of the training batches per family ("vision", "vision_small",
        "text"): the held-out settings with the training mixes, and `train_min_objects` on the
        full-size scenes."""
        return {"vision": dataclasses.replace(self.task_config(self.vision_mix),
                                              min_objects=self.train_min_objects),
                "vision_small": self.small_task_config(self.vision_mix_small),
                "text": self.task_config(TEXT_MIX)}


VOCAB_SIZE = 256  # the default task suite's 240 tokens, rounded up to a multiple of 64


def vocab_size_for(tokenizer) -> int:
    """The embedding rows for `tokenizer`: at least VOCAB_SIZE, a multiple of 64."""
    return max(VOCAB_SIZE, round_up(len(tokenizer), 64))


def model_config(vocab_size: int = VOCAB_SIZE, image_token_id: int = 12,
                 attention_heads: int = 4, head_dim: int = 32) -> KimiVLConfig:
    """The testbed architecture: Kimi-VL's layout at toy width (experts hold ~75% of weights).

    The dense first layer is only 32 wide, so the facts have to live in the routed experts:
    with it 256 wide, zeroing that one MLP took both families to 2% while switching off every
    routed expert cost 8 text points (KL 0.25); at 32 wide, routed-off costs 15 text points
    after 500 steps. (A narrower variant, experts 64 wide with top-4 routing, learned far
    slower: 40% vision and 16% fact_choice after 1600 steps.)
    """
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=attention_heads, kv_lora_rank=64, qk_nope_head_dim=head_dim,
        qk_rope_head_dim=16, v_head_dim=head_dim, q_lora_rank=None, moe_intermediate_size=128,
        n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        routed_scaling_factor=2.446, rms_norm_eps=1e-5, rope_theta=10000.0)
    vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                          pos_emb_height=16, pos_emb_width=16)
    return KimiVLConfig(text=text, vision=vision, media_placeholder_token_id=image_token_id,
                        pad_token_id=0)


# ---------------------------------------------------------------- training-only expert dispatch
def capacity_experts(x, ids, weights, gate_up, down, capacity: int):
    """Routed experts with at most `capacity` (token, slot) pairs per expert: `[N, D]`.

    x `[N, D]`, ids/weights `[N, k]`, gate_up `[E, D, 2F]`, down `[E, F, D]`. Pairs are taken
    in token order; an expert's pairs past its capacity contribute nothing this step. With
    enough capacity it equals `moe.experts_dense`.
    """
    n, k = ids.shape
    e, f = gate_up.shape[0], down.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e)
    starts = jnp.cumsum(sizes) - sizes
    slot = jnp.arange(capacity)[None, :]
    valid = slot < sizes[:, None]  # [E, C]
    pair = order[jnp.clip(starts[:, None] + slot, 0, n * k - 1)]  # flat (token * k + slot)
    token = pair // k
    xe = x[token] * valid[..., None].astype(x.dtype)
    h = jnp.einsum("ecd,edf->ecf", xe, gate_up)
    y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(h[..., :f]) * h[..., f:], down)
    w = jnp.where(valid, weights.reshape(-1)[pair], 0.0).astype(jnp.float32)
    out = jnp.zeros((n, x.shape[1]), jnp.float32)
    contrib = (y.astype(jnp.float32) * w[..., None]).reshape(-1, y.shape[-1])
    out = out.at[token.reshape(-1)].add(contrib)
    return out.astype(x.dtype)


class CapacityExperts(nnx.Module):
    """Stand-in for `StackedExperts` during training; shares its `gate_up`/`down` variables."""

    def __init__(self, gate_up: nnx.Param, down: nnx.Param, capacity_factor: float):
        self.gate_up, self.down = gate_up, down
        self.capacity_factor = capacity_factor

    def __call__(self, x, ids, weights):
        e, k = self.gate_up.shape[0], ids.shape[-1]
        capacity = min(x.shape[0] * k, math.ceil(self.capacity_factor * x.shape[0] * k / e))
        return capacity_experts(x, ids, weights, self.gate_up[...], self.down[...], capacity)


def use_capacity_dispatch(model: KimiVL, capacity_factor: float) -> None:
    """Swap every MoE layer's experts for `CapacityExperts` (same parameters, same paths)."""
    for layer in model.language_model.layers:
        if layer.is_moe:
            old = layer.mlp.experts
            layer.mlp.experts = CapacityExperts(old.gate_up, old.down, capacity_factor)


class DroppedShared(nnx.Module):
    """Training stand-in for a layer's shared experts (same Linear modules, same paths): each
    row of the batch skips them with probability `rate`, the kept rows scaled by 1 / (1 - rate).
    """

    def __init__(self, mlp, rate: float, seed: int):
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.rate = rate
        self.rngs = nnx.Rngs(shared_dropout=seed)
        self.deterministic = False  # True: the plain shared MLP (held-out probes)

    def __call__(self, x: jax.Array) -> jax.Array:  # x [B, T, D]
        y = self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.deterministic:
            return y
        keep = jax.random.bernoulli(self.rngs.shared_dropout(), 1 - self.rate, (x.shape[0], 1, 1))
        return jnp.where(keep, y / (1 - self.rate), jnp.zeros_like(y))


def use_shared_dropout(model: KimiVL, rate: float, seed: int) -> list:
    """Swap every MoE layer's shared experts for `DroppedShared`; returns the originals for
    `restore_shared` (they hold the same, trained, Linear modules). A no-op at rate 0."""
    originals = []
    for i, layer in enumerate(model.language_model.layers):
        if rate and layer.is_moe and layer.mlp.shared_experts is not None:
            originals.append((layer, layer.mlp.shared_experts))
            layer.mlp.shared_experts = DroppedShared(layer.mlp.shared_experts, rate, seed + i)
    return originals


def shared_dropout_on(model: KimiVL, on: bool) -> None:
    """Switch every `DroppedShared` of `model` between training (`on`) and the plain MLP."""
    for layer in model.language_model.layers:
        if isinstance(getattr(layer.mlp, "shared_experts", None), DroppedShared):
            layer.mlp.shared_experts.deterministic = not on


def restore_shared(originals: list) -> None:
    """Undo `use_shared_dropout`: the plain shared MLPs, with their trained weights."""
    for layer, mlp in originals:
        layer.mlp.shared_experts = mlp


def zero_mlp_down(model: KimiVL) -> None:
    """Zero the down projection of every language-model MLP: dense, shared and routed experts."""
    for down in card.down_projections(model):
        down.set_value(jnp.zeros_like(down.get_value()))


# ---------------------------------------------------------------- data
def round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def encode_rows(samples: Sequence[tasks.Sample], tokenizer, image_cfg: ImageConfig,
                length: int) -> dict[str, np.ndarray]:
    """Right-padded teacher-forcing rows: ids, attention mask, answer-target mask, images, and
    for the look-up aid the position that predicts the answer (`query_mask`) and the image
    tokens of the object the question names (`lookup_mask`, all False when it names none).

    `length` is a minimum (rounded up to a multiple of 8 if a row is longer), so batches of a
    family keep one shape and one compiled step.
    """
    images = [s.image for s in samples if s.image is not None]
    pixels = preprocess_images(images, image_cfg) if images else None
    grids = iter(pixels["image_grid_hws"]) if pixels else iter(())
    rows = []
    for s in samples:
        grid = [next(grids)] if s.image is not None else None
        rows.append(tok_lib.encode_example(tokenizer, s.prompt, s.answer, grid))
    length = max(length, round_up(max(len(ids) for ids, _ in rows)))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    target = np.zeros((len(rows), length), bool)
    query = np.zeros((len(rows), length), bool)
    lookup = np.zeros((len(rows), length), bool)
    image_token = tok_lib.image_token_id(tokenizer)
    for b, ((row, answer), s) in enumerate(zip(rows, samples, strict=True)):
        ids[b, :len(row)], mask[b, :len(row)], target[b, :len(row)] = row, True, answer
        query[b, np.argmax(answer) - 1] = True
        image_at = np.flatnonzero(row == image_token)  # merged tokens in raster order
        if s.target_cells and max(s.target_cells) >= len(image_at):
            raise ValueError(f"{s.question!r}: its object's cell {max(s.target_cells)} is past "
                             f"the {len(image_at)} image tokens (was the image resized?)")
        lookup[b, image_at[list(s.target_cells)]] = True
    out = {"input_ids": ids, "attention_mask": mask, "target_mask": target, "query_mask": query,
           "lookup_mask": lookup, "pixel_values": None, "grid_hws": None}
    if pixels:
        out["pixel_values"] = pixels["pixel_values"]
        out["grid_hws"] = tuple(tuple(int(v) for v in g) for g in pixels["image_grid_hws"])
    return out


def split_static(rows: dict) -> tuple[dict, tuple | None]:
    """(arrays for jit, the static `grid_hws`)."""
    return {k: v for k, v in rows.items() if k != "grid_hws"}, rows["grid_hws"]



class Batches:
    """Fresh training batches per step, deterministic in (seed, step)."""

    def __init__(self, cfg: TrainConfig, tokenizer, image_cfg: ImageConfig):
        self.cfg, self.tokenizer, self.image_cfg = cfg, tokenizer, image_cfg
        self.configs = cfg.training_configs()
        # Held-out probes are drawn as the held-out split is (no train_min_objects).
        self.probe_configs = {"vision": cfg.task_config(cfg.vision_mix),
                              "vision_small": cfg.small_task_config(cfg.vision_mix_small),
                              "text": cfg.task_config(TEXT_MIX)}
        self.lengths = {"vision": 184, "vision_small": 80, "text": 40}

    def family(self, name: str, split: str, n: int, seed: int
               ) -> tuple[dict[str, np.ndarray], list[str]]:
        """(encode_rows batch, each row's task) of `n` fresh samples of one family
        ("vision", "vision_small" or "text")."""
        config = (self.configs if split == "train" else self.probe_configs)[name]
        samples = tasks.generate(split, n, seed, config)
        rows = encode_rows(samples, self.tokenizer, self.image_cfg, self.lengths[name])
        self.lengths[name] = rows["input_ids"].shape[1]
        return rows, [s.task for s in samples]

    def step(self, step: int) -> tuple[dict, dict]:
        base = self.cfg.seed * 10_000_000 + 2 * step
        small = step <= self.cfg.small_image_steps
        vision = self.family("vision_small" if small else "vision", "train",
                             self.cfg.batch_vision_small if small else self.cfg.batch_vision, base)
        n_text = self.cfg.batch_text_small if small else self.cfg.batch_text
        return vision[0], self.family("text", "train", n_text, base + 1)[0]


# ---------------------------------------------------------------- the step
def answer_loss(model: KimiVL, rows: dict, grid_hws, context_weight: float = 0.0,
                label_smoothing: float = 0.0, lookup_weight: float = 0.0, lookup_layer: int = 1
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(answer loss + context_weight * context loss, [L_moe, E] routed-token counts, [B] row
    all-correct, answer loss).

    Answer loss: mean cross-entropy of the answer tokens. Context loss: mean cross-entropy of
    the other real text tokens (question and chat markers; image placeholders excluded). After
    an image, naming an object of the scene ("what color is the [circle]") needs the image, so
    this gives the vision tower a dense signal long before answers do.

    `label_smoothing` e trains the answer tokens towards (1 - e) on the target plus e spread over
    the vocabulary; it bounds the margin cross-entropy keeps pushing up (the reported answer
    loss stays the plain cross-entropy).

    `lookup_weight` adds that times `lookup_loss` (the look-up aid; rows naming no object add
    nothing).
    """
    out = model.forward(rows["input_ids"], rows["attention_mask"], rows["pixel_values"],
                        grid_hws, return_routing=True,
                        image_query_mask=rows["query_mask"] if lookup_weight else None)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    targets, answer = rows["input_ids"][:, 1:], rows["target_mask"][:, 1:]
    context = (rows["attention_mask"][:, 1:].astype(bool) & ~answer
               & (targets != model.config.media_placeholder_token_id))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    def mean(where):
        return jnp.sum(jnp.where(where, nll, 0.0)) / jnp.maximum(where.sum(), 1)

    loss = mean(answer)
    fit = loss
    if label_smoothing:  # a Python branch: the default recipe's graph is unchanged
        smoothed = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
        fit = jnp.sum(jnp.where(answer, smoothed, 0.0)) / jnp.maximum(answer.sum(), 1)
    real = rows["attention_mask"].astype(jnp.float32)
    e = model.config.text.n_routed_experts
    counts = jnp.stack([jnp.einsum("btke,bt->e", jax.nn.one_hot(ids, e), real)
                        for ids, _ in out.routing])
    hit = (jnp.argmax(out.logits[:, :-1], -1) == targets) | ~answer
    total = fit + context_weight * mean(context)
    if lookup_weight:
        total += lookup_weight * lookup_loss(out.image_scores[lookup_layer], rows["lookup_mask"],
                                             model.config.text.num_attention_heads)
    return total, counts, jnp.all(hit, axis=1), loss


def lookup_loss(scores: jax.Array, lookup_mask: jax.Array, heads: int) -> jax.Array:
    """Mean over rows that name an object of -log(min(1, heads * mass)), where mass is the
    head-mean attention `scores [B, S]` of the answer-predicting query on the named object's
    tokens: zero once one head's worth of attention finds the object, so the other heads stay
    free for what else the answer needs."""
    mass = jnp.sum(jnp.where(lookup_mask, scores, 0.0), axis=-1)
    named = lookup_mask.any(-1)
    nll = -jnp.log(jnp.clip(heads * mass, 1e-6, 1.0))
    return jnp.sum(jnp.where(named, nll, 0.0)) / jnp.maximum(named.sum(), 1)


def trainable(freeze_vision: bool):
    """What the optimizer updates: every Param but the routers' correction biases (set by the
    balancing rule) and, when `freeze_vision`, the warmed-up vision tower (its forward then
    needs no backward pass; the projector still trains)."""
    frozen = [nnx.PathContains("e_score_correction_bias")]
    if freeze_vision:
        frozen.append(nnx.PathContains("vision_tower"))
    return nnx.All(nnx.Param, *(nnx.Not(f) for f in frozen))


@nnx.jit(static_argnames=("grid_hws", "gamma", "context_weight", "freeze_vision",
                          "lookup_weight", "lookup_layer"))
def train_step(model: KimiVL, optimizer: nnx.Optimizer, vision: dict, text: dict, grid_hws,
               gamma: float, context_weight: float, freeze_vision: bool,
               lookup_weight: float = 0.0, lookup_layer: int = 1):
    """One AdamW step on the mean of the two families' losses, then the bias update.

    Reports (total loss, vision answer loss, text answer loss, routed-token counts).

    `vision` and `text` are `encode_rows` batches without their `grid_hws` (the vision one's
    is the static `grid_hws`; text rows have no images).
    """

    def loss_fn(model):
        total_v, cv, _, lv = answer_loss(model, vision, grid_hws, context_weight,
                                         lookup_weight=lookup_weight, lookup_layer=lookup_layer)
        total_t, ct, _, lt = answer_loss(model, text, None, context_weight)
        return (total_v + total_t) / 2, (lv, lt, cv + ct)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable(freeze_vision)),
                                 has_aux=True)
    (loss, (lv, lt, counts)), grads = grad_fn(model)
    optimizer.update(model, grads)
    balance_experts(model, counts, gamma)
    return loss, lv, lt, counts


def balance_experts(model: KimiVL, counts: jax.Array, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: every MoE layer's correction bias moves by
    `gamma * sign(mean count - count_e)` (`counts [L_moe, E]`, routed tokens this step)."""
    moe_layers = [layer for layer in model.language_model.layers if layer.is_moe]
    for layer, count in zip(moe_layers, counts, strict=True):
        bias = layer.mlp.gate.e_score_correction_bias
        bias[...] = bias[...] + gamma * jnp.sign(count.mean() - count)


@nnx.jit(static_argnames=("grid_hws",))
def probe(model: KimiVL, rows: dict, grid_hws) -> jax.Array:
    """[B] bool: every answer token is the argmax (= greedy decoding returns the answer)."""
    return answer_loss(model, rows, grid_hws)[2]


# ---------------------------------------------------------------- the run
def make_optimizer(model: KimiVL, lr: float, warmup: int, steps: int, clip_norm: float,
                   weight_decay: float, freeze_vision: bool) -> nnx.Optimizer:
    """AdamW on `trainable(freeze_vision)`: linear warm-up, cosine decay to 2% of `lr`, global
    norm clipping."""
    return nnx.Optimizer(model, _adamw(lr, warmup, steps, clip_norm, weight_decay),
                         wrt=trainable(freeze_vision))


@functools.cache
def _adamw(lr: float, warmup: int, steps: int, clip_norm: float,
           weight_decay: float) -> optax.GradientTransformation:
    """One transformation object per setting. nnx.jit keys a step's compiled program on the
    optimizer's structure, which holds the transformation (compared by identity), so a second
    run with the same setting in one process (a retrain, another probe) reuses the compiled
    steps instead of tracing and compiling them again."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.02)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b2=0.98, weight_decay=weight_decay))


def build_tokenizer(cfg: TrainConfig = TrainConfig()):
    return tok_lib.build_tokenizer(tasks.vocabulary(cfg.task_config()))


def train(cfg: TrainConfig, out_dir: str | Path, log=print) -> dict:
    """Train, export to `out_dir`, reload it, score the held-out split; returns the summary."""
    if not 0 <= cfg.warmup < cfg.steps:
        raise ValueError(f"warmup={cfg.warmup} must be at least 0 and below steps={cfg.steps}")
    if cfg.portable_math:
        portable_math.enable()  # before the first array, or a clear error
    t_start = time.time()
    tokenizer = build_tokenizer(cfg)
    image_cfg = ImageConfig()
    config = model_config(vocab_size=vocab_size_for(tokenizer),
                          image_token_id=tok_lib.image_token_id(tokenizer),
                          attention_heads=cfg.attention_heads, head_dim=cfg.head_dim)
    model = KimiVL(config, rngs=nnx.Rngs(cfg.seed))
    pos = model.vision_tower.pos_emb  # N(0, 1) would drown the patch content at the start
    pos.set_value(pos.get_value() * cfg.pos_emb_init)
    warm = vision_warmup.warm_up(model, steps=cfg.vision_warmup_steps,
                                 batch_size=cfg.vision_warmup_batch, lr=cfg.vision_warmup_lr,
                                 seed=cfg.seed, image_cfg=image_cfg,
                                 task_cfgs=(cfg.task_config(), cfg.small_task_config())
                                 if cfg.small_image_steps else (cfg.task_config(),),
                                 log=log, log_every=cfg.log_every,
                                 relation_share=cfg.warmup_relation_share)
    if cfg.zero_init_down:
        zero_mlp_down(model)
    use_capacity_dispatch(model, cfg.capacity_factor)
    dropped = use_shared_dropout(model, cfg.shared_dropout, cfg.seed)
    optimizer = make_optimizer(model, cfg.lr, cfg.warmup, cfg.steps, cfg.clip_norm,
                               cfg.weight_decay, cfg.freeze_vision)
    data = Batches(cfg, tokenizer, image_cfg)
    probes = {f: data.family(f, "heldout", cfg.probe_samples, cfg.seed + 7)
              for f in ("vision", "text")}
    log(f"testbed: {_count(model)} parameters, {cfg.steps} steps of "
        f"{cfg.batch_vision} vision + {cfg.batch_text} text samples")
    history, window = [], []
    for step in range(1, cfg.steps + 1):
        (vision, grid_hws), (text, _) = (split_static(rows) for rows in data.step(step))
        loss, lv, lt, counts = train_step(model, optimizer, vision, text, grid_hws,
                                          cfg.bias_gamma, cfg.context_weight, cfg.freeze_vision,
                                          cfg.lookup_weight, cfg.lookup_layer)
        window.append((loss, lv, lt))
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean = np.mean(np.asarray(jax.device_get(window)), axis=0)
            shared_dropout_on(model, False)  # the probes score the model as it will run
            hits = {f: np.asarray(probe(model, *split_static(rows)))
                    for f, (rows, _) in probes.items()}
            shared_dropout_on(model, True)
            acc = {f: float(np.mean(h)) for f, h in hits.items()}
            per_task = {t: float(np.mean([h for h, tt in zip(hits[f], names, strict=True)
                                          if tt == t]))
                        for f, (_, names) in probes.items() for t in sorted(set(names))}
            c = np.asarray(counts)
            balance = float((c.max(-1) / np.maximum(c.mean(-1), 1)).max())
            history.append({"step": step, "loss": float(mean[0]), "vision_loss": float(mean[1]),
                            "text_loss": float(mean[2]), "probe": acc, "probe_task": per_task,
                            "seconds": time.time() - t_start})
            log(f"step {step:5d}  loss {mean[0]:.4f} (vision {mean[1]:.4f}, text {mean[2]:.4f})"
                f"  held-out probe vision {acc['vision']:.3f} text {acc['text']:.3f}"
                f"  max/mean expert load {balance:.2f}  {time.time() - t_start:.0f}s\n"
                "    " + " ".join(f"{t} {a:.2f}" for t, a in per_task.items()))
            window = []
    train_seconds = time.time() - t_start
    restore_shared(dropped)
    out_dir = Path(out_dir)
    model = outliers.apply(model, cfg.fold())
    export.save(model, out_dir, tokenizer=tokenizer, image_config=image_cfg)
    summary = {"train_config": dataclasses.asdict(cfg),
               "task_config": dataclasses.asdict(cfg.task_config()), "parameters": _count(model),
               "train_seconds": train_seconds, "arithmetic": portable_math.describe(),
               "vision_warmup": warm, "history": history}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # The card reloads the export, as users do, and adds its figures to train_summary.json.
    return summary | card.write(out_dir, cfg.eval_samples, log)


def _count(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _flag_type(default):
    if not isinstance(default, bool):
        return type(default)

    def parse(text: str) -> bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

    return parse


def _flag_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def command_line(cfg: TrainConfig, out: str = "checkpoints/testbed") -> str:
    """The command that trains `cfg`: the recipe's defaults are left out, so the shipped
    checkpoint's card shows the bare command and a probe run's card shows its flags."""
    defaults = TrainConfig()
    flags = [f"--{f.name} {_flag_text(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) != getattr(defaults, f.name)]
    return " ".join(["python -m mode_jax.testbed.train --out", out, *flags])


def main(argv: Sequence[str] | None = None) -> None:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    for field in dataclasses.fields(TrainConfig):
        value = getattr(defaults, field.name)
        if isinstance(value, tuple) and isinstance(value[0], str):  # a task mix
            p.add_argument(f"--{field.name}", nargs="+", default=value)
        elif isinstance(value, tuple):
            p.add_argument(f"--{field.name}", type=int, nargs=len(value), default=value)
        else:
            p.add_argument(f"--{field.name}", type=_flag_type(value), default=value)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    try:
        cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ValueError as e:
        p.error(str(e))  # usage line + message, exit code 2
    train(cfg, out, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
