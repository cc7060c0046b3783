"""Vision warm-up: teach the testbed's MoonViT + projector what is where before the MLLM stage.

Kimi-VL's vision tower is pretrained before it meets the language model; a tower trained from
scratch through the language model alone learns shapes very slowly (the answer is a word or two
per image, reached through attention over 144 image tokens). This stage gives it a dense
signal instead: random scenes drawn with the task suite's own renderer (`tasks.render`), and for
every merged image token (a 28 x 28 pixel cell) the shape and the colour of the object covering
it (or background), whether it holds an object's centre (one token per object: what counting
needs) and its row and column in the grid, predicted from the projector's output by linear
heads that are thrown away afterwards. Optionally (`relation_share` > 0) that share of the
scenes holds exactly two objects, as a position question's scene does, and every cell of each
object is also labelled with where that object lies relative to the other (left/right/above/
below, `tasks.RELATIONS`): what "where is a relative to b" needs, put where the language model
reads an object's colour and shape.
Only the vision tower and projector are trained here.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mode_jax.models.kimivl import KimiVL
from mode_jax.preprocess import ImageConfig, preprocess_images
from mode_jax.testbed import tasks

BACKGROUND = 0  # label 0; shapes and colours are 1-based in tasks.SHAPES / tasks.COLORS order


def random_scene(rng: np.random.Generator, task_cfg: tasks.TaskConfig,
                 relation_share: float = 0.0) -> list[tasks.Shape]:
    """1..max_objects objects of random shape and colour, placed as the task suite places them;
    exactly two with probability `relation_share`."""
    two = bool(relation_share) and rng.random() < relation_share  # no draw when off
    for _ in range(1000):
        n = 2 if two else int(rng.integers(1, task_cfg.max_objects + 1))
        kinds = [(str(rng.choice(tasks.SHAPES)), str(rng.choice(list(tasks.COLORS))))
                 for _ in range(n)]
        placed = tasks.place(rng, kinds, task_cfg)
        if placed is not None:
            return list(placed)
    raise ValueError(f"no scene of {task_cfg.max_objects} objects fits image_size "
                     f"{task_cfg.image_size} (object_size {task_cfg.object_size}, "
                     f"cell {task_cfg.cell})")


def cell_labels(objects: list[tasks.Shape], image_size: tuple[int, int], texture_seed: int,
                cell: int = 28, min_cover: float = 0.15
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8, then per cell in raster order: shape label, colour label,
    1 where an object's centre lies, relation label).

    The relation label is 1 + the index in `tasks.RELATIONS` of where the cell's object lies
    relative to the other object in a two-object scene whose relation is clear (the task
    suite's own `tasks.relation`), else 0 (no label).

    A cell takes the object covering the largest share of its pixels if that share is at least
    `min_cover`. Object pixels are where drawing the object alone changes the background (the
    renderer draws the same background for the same texture seed).
    """
    background = tasks.render([], image_size, texture_seed).astype(np.int16)
    h, w = image_size
    cover = np.zeros((len(objects) + 1, h // cell, w // cell))
    for i, o in enumerate(objects, start=1):
        alone = tasks.render([o], image_size, texture_seed).astype(np.int16)
        mask = np.any(alone != background, axis=-1)
        cover[i] = mask.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))
    cover[0] = min_cover - 1e-6  # background wins below the threshold
    best = cover.argmax(0).reshape(-1)
    shapes = np.asarray([BACKGROUND] + [tasks.SHAPES.index(o.shape) + 1 for o in objects])
    colors = np.asarray([BACKGROUND] + [list(tasks.COLORS).index(o.color) + 1 for o in objects])
    centre = np.zeros((h // cell, w // cell), np.int32)
    for o in objects:
        centre[o.cy // cell, o.cx // cell] = 1
    relations = np.zeros(len(objects) + 1, np.int32)
    if len(objects) == 2:
        for i, (a, b) in enumerate((objects, objects[::-1]), start=1):
            where = tasks.relation(a, b)
            relations[i] = 0 if where is None else tasks.RELATIONS.index(where) + 1
    return (tasks.render(objects, image_size, texture_seed), shapes[best], colors[best],
            centre.reshape(-1), relations[best])


def batch(rng: np.random.Generator, n: int, task_cfg: tasks.TaskConfig, image_cfg: ImageConfig,
          grid: int = 12, relation_share: float = 0.0):
    """(pixel_values, grid_hws, labels) for n scenes; labels [6, N_tok]: shape, colour, centre,
    row, column, relation. Row and column are on a `grid`-cell scale whatever the image size
    (the centre of cell i of n falls in label (2i + 1) * grid // 2n), as the position embedding
    is resampled to the image."""
    images, labels = [], []
    rows, cols = (g // 28 for g in task_cfg.image_size)
    grid_row, grid_col = np.divmod(np.arange(rows * cols), cols)
    grid_row, grid_col = (2 * grid_row + 1) * grid // (2 * rows), (2 * grid_col + 1) * grid // (
        2 * cols)
    for _ in range(n):
        scene = random_scene(rng, task_cfg, relation_share)
        image, *per_cell, relations = cell_labels(scene, task_cfg.image_size,
                                                  int(rng.integers(2**31)))
        images.append(image)
        labels.append(np.stack([*per_cell, grid_row, grid_col, relations]))
    pixels = preprocess_images(images, image_cfg)
    grids = tuple(tuple(int(v) for v in g) for g in pixels["image_grid_hws"])
    return pixels["pixel_values"], grids, np.concatenate(labels, axis=1)


class Heads(nnx.Module):
    """Linear read-outs of the projector output (training-only): shape, colour, centre, row,
    column (`grid` cells per side at most), and the relation if asked for."""

    def __init__(self, width: int, grid: int, rngs: nnx.Rngs, relation: bool = False):
        self.shape = nnx.Linear(width, len(tasks.SHAPES) + 1, rngs=rngs)
        self.color = nnx.Linear(width, len(tasks.COLORS) + 1, rngs=rngs)
        self.centre = nnx.Linear(width, 2, rngs=rngs)
        self.row = nnx.Linear(width, grid, rngs=rngs)
        self.col = nnx.Linear(width, grid, rngs=rngs)
        self.relation = nnx.Linear(width, len(tasks.RELATIONS) + 1, rngs=rngs) if relation else None


class Warmup(nnx.Module):
    """The model's vision tower and projector (shared variables) plus the heads."""

    def __init__(self, model: KimiVL, grid: int, rngs: nnx.Rngs, relation: bool = False):
        self.vision_tower = model.vision_tower
        self.multi_modal_projector = model.multi_modal_projector
        self.heads = Heads(model.config.text.hidden_size, grid, rngs, relation)

    def loss(self, pixel_values, grid_hws, labels):
        """Summed cross-entropies per token; object tokens weigh 4x, centres 16x (they are few).

        Returns (loss, [5] accuracy on object tokens of shape, colour, on centre tokens, of
        (row, column) on all tokens, and of the relation on the tokens that have one)."""
        x = self.multi_modal_projector(self.vision_tower(pixel_values, grid_hws))
        shapes, colors, centres, rows, cols, relations = labels
        obj = shapes != BACKGROUND
        logits = (self.heads.shape(x), self.heads.color(x), self.heads.centre(x))
        ce = [optax.softmax_cross_entropy_with_integer_labels(z, y)
              for z, y in zip(logits, (shapes, colors, centres), strict=True)]
        weight = jnp.where(obj, 4.0, 1.0)
        loss = (jnp.sum(weight * (ce[0] + ce[1])) / jnp.sum(weight)
                + jnp.sum(jnp.where(centres == 1, 16.0, 1.0) * ce[2]) / centres.shape[0])
        where = (self.heads.row(x), self.heads.col(x))
        loss += 0.5 * sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))
                          for z, y in zip(where, (rows, cols), strict=True))
        placed = jnp.mean((jnp.argmax(where[0], -1) == rows) & (jnp.argmax(where[1], -1) == cols))
        right = [jnp.argmax(z, -1) == y for z, y in zip(logits, (shapes, colors, centres),
                                                          strict=True)]
        n, c = jnp.maximum(obj.sum(), 1), jnp.maximum(centres.sum(), 1)
        related, relation_acc = relations > 0, jnp.zeros(())
        if self.heads.relation is not None:
            z = self.heads.relation(x)
            ce = optax.softmax_cross_entropy_with_integer_labels(z, relations)
            r = jnp.maximum(related.sum(), 1)
            loss += jnp.sum(jnp.where(related, ce, 0.0)) / r
            relation_acc = jnp.sum((jnp.argmax(z, -1) == relations) & related) / r
        acc = jnp.stack([jnp.sum(right[0] & obj) / n, jnp.sum(right[1] & obj) / n,
                         jnp.sum(right[2] & (centres == 1)) / c, placed, relation_acc])
        return loss, acc


@functools.cache
def _adamw(lr: float, steps: int) -> optax.GradientTransformation:
    """One object per setting, so a second warm-up in one process reuses `_step`'s compiled
    program (nnx.jit keys it on the optimizer's structure; train._adamw says more)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps,
                                                  end_value=lr * 0.1)
    return optax.adamw(schedule, b2=0.98, weight_decay=0.01)


@nnx.jit(static_argnames=("grid_hws",))
def _step(warmup: Warmup, optimizer: nnx.Optimizer, pixel_values, grid_hws, labels):
    (loss, acc), grads = nnx.value_and_grad(
        lambda m: m.loss(pixel_values, grid_hws, labels), has_aux=True)(warmup)
    optimizer.update(warmup, grads)
    return loss, acc


def warm_up(model: KimiVL, *, steps: int, batch_size: int, lr: float, seed: int,
            task_cfgs: Sequence[tasks.TaskConfig], image_cfg: ImageConfig,
            log: Callable[[str], None] = print, log_every: int = 50,
            relation_share: float = 0.0) -> dict:
    """Train `model`'s vision tower and projector in place; returns the last losses/accuracy.

    Step i draws its scenes with `task_cfgs[i % len(task_cfgs)]` (e.g. two image sizes);
    `relation_share` of them hold two objects with relation labels (0: no relation head)."""
    if not 0.0 <= relation_share <= 1.0:
        raise ValueError(f"relation_share must be in [0, 1], got {relation_share}")
    grid = max(max(c.image_size) for c in task_cfgs) // 28
    warmup = Warmup(model, grid, nnx.Rngs(seed), relation=relation_share > 0)
    optimizer = nnx.Optimizer(warmup, _adamw(lr, steps), wrt=nnx.Param)
    rng = np.random.default_rng([seed, 11])
    start, window, out = time.time(), [], {}
    for step in range(1, steps + 1):
        task_cfg = task_cfgs[step % len(task_cfgs)]
        loss, acc = _step(warmup, optimizer,
                          *batch(rng, batch_size, task_cfg, image_cfg, grid, relation_share))
        window.append((loss, acc))
        if step % log_every == 0 or step == steps:
            loss = float(np.mean([float(x) for x, _ in window]))
            acc = np.mean([np.asarray(a) for _, a in window], axis=0)
            out = {"step": step, "loss": loss, "object_shape_accuracy": float(acc[0]),
                   "object_color_accuracy": float(acc[1]), "centre_recall": float(acc[2]),
                   "cell_position_accuracy": float(acc[3]),
                   **({"relation_accuracy": float(acc[4])} if relation_share else {}),
                   "seconds": time.time() - start}
            log(f"vision warm-up {step:4d}  loss {loss:.4f}  object tokens: shape "
                f"{acc[0]:.3f} colour {acc[1]:.3f}  centres found {acc[2]:.3f}  "
                f"cell position {acc[3]:.3f}  "
                + (f"relation {acc[4]:.3f}  " if relation_share else "") +
                f"{time.time() - start:.0f}s")
            window = []
    return out
