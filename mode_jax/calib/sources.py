"""Where calibration batches come from, chosen by `config.data.source`.

- "sharegpt": a ShareGPT4V-style JSON + image directory and the checkpoint's tokenizer (real
  models; method.md stage 1).
- "testbed": the synthetic task suite's train split and the checkpoint's tokenizer. Statistics
  use image prompts (as the reference does); GPTQ uses both families with their answers, so
  experts that serve text-only questions also get Hessians.
- "random": seeded random token ids with one random image per sample, for checkpoints that
  ship no tokenizer (the tiny test fixture). It exercises every code path, nothing more.
Purpose "stats" gives human-only prompts (no answer); "gptq" gives whole conversations.

Each stage draws its records with its own seed (`SEED_OFFSETS`, added to `config.seed`); with
ShareGPT data the evaluate stage scores the records none of those draws took (`heldout`).

`cache` (a dict the caller keeps for one run, main.py's shared stage cache) holds the parsed
ShareGPT file and the tokenizer, so a run reads each once. A LLaVA-mix-sized file (665k
records) takes about 7 s to parse and check and holds about 1 GB of host memory for the run
(`python -m benchmarks.calib_read`); Kimi-VL's tokenizer takes 3 s to build
(`benchmarks.tokenizer_load`). Every stage and every method of a sweep paid both before.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from mode_jax import preprocess, processors
from mode_jax.calib import data
from mode_jax.convert import families

log = logging.getLogger(__name__)

SOURCES = ("sharegpt", "testbed", "random")
# config.seed + offset draws each stage's records; (stage, data field holding its count)
SEED_OFFSETS = {"calibrate": 0, "sensitivity": 1, "quantize": 2, "evaluate": 3}
DRAWS = (("calibrate", "num_freq_samples"), ("sensitivity", "num_sens_samples"),
         ("quantize", "num_gptq_samples"))
DEFAULT_HELDOUT_CONVERSATIONS = 256  # eval.num_samples = 0 with ShareGPT data
PURPOSES = ("stats", "gptq")
NOT_MULTIMODAL = ("the model has no vision tower: MODE needs a multimodal checkpoint (model_type "
                  "kimi_vl, qwen3_vl_moe or internvl)")
STATS_TASKS = ("vision", "all")  # data.testbed_stats_tasks


@dataclasses.dataclass(frozen=True)
class Calibration:
    batches: list[dict]
    image_token_id: int
    special_token_ids: tuple[int, ...]


def _check(source: str, purpose: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}; allowed: {', '.join(SOURCES)}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r}; allowed: {', '.join(PURPOSES)}")


def load(data_cfg, model_path: str, model_config, n: int, seed: int, purpose: str,
         cache: dict | None = None) -> Calibration:
    """Batches for `purpose` with the token ids the statistics need."""
    _check(data_cfg.source, purpose)
    image_id = families.image_token_id(model_config)
    if image_id is None or model_config.vision is None:
        raise ValueError(NOT_MULTIMODAL)
    if data_cfg.source == "random":
        return Calibration(random_batches(model_config, n, data_cfg.batch_size, seed),
                           int(image_id), ())
    tokenizer = checkpoint_tokenizer(model_path, cache)
    if data_cfg.source == "sharegpt":
        samples = data.sharegpt_samples(data_cfg.calib_json, data_cfg.image_dir, n, seed,
                                        human_only=purpose == "stats",
                                        records=sharegpt_records(data_cfg, cache))
    else:
        samples = testbed_samples(n, seed, purpose, model_path, data_cfg.testbed_stats_tasks)
    return _calibration(samples, data_cfg, model_path, model_config, tokenizer, cache=cache)


def _cached(cache: dict | None, key: tuple, make):
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def sharegpt_records(data_cfg, cache: dict | None = None) -> list[dict]:
    """The calibration file's image records (`data.read_sharegpt`), read once per `cache`."""
    if not data_cfg.calib_json:
        raise ValueError("data.source='sharegpt' needs --config.data.calib_json and "
                         "--config.data.image_dir")
    return _cached(cache, ("sharegpt", data_cfg.calib_json, data_cfg.image_dir),
                   lambda: data.read_sharegpt(data_cfg.calib_json, data_cfg.image_dir))


def benchmark(jsonl_path: str, cache: dict | None = None) -> list:
    """The validated items of a benchmark JSONL (`eval.jsonl.read_benchmark`), once per cache."""
    from mode_jax.eval import jsonl

    return _cached(cache, ("benchmark", jsonl_path), lambda: jsonl.read_benchmark(jsonl_path))


def tokenizer(model_path: str, cache: dict | None = None):
    """`preprocess.load_tokenizer(model_path)` (None without tokenizer files), once per cache."""
    return _cached(cache, ("tokenizer", model_path),
                   lambda: preprocess.load_tokenizer(model_path))


def checkpoint_tokenizer(model_path: str, cache: dict | None = None):
    """The checkpoint's tokenizer, which real prompts need, or a clear error."""
    found = tokenizer(model_path, cache)
    if found is None:
        raise ValueError(f"{model_path} has no tokenizer files (tokenizer.json / "
                         "tokenizer_config.json), which real prompts need; use "
                         "data.source='random' (and no eval.jsonl) for a smoke run")
    return found


def _calibration(samples, data_cfg, model_path: str, model_config, tokenizer,
                 batch_size: int = 0, cache: dict | None = None) -> Calibration:
    """`samples` as the family's batches (`batch_size` each, 0 = data.batch_size), with the ids
    the statistics need. Batches of several hold one tuple of image grids where they can
    (`data.group_by_image_grid`: fewer programs to compile); each size's grid is measured once
    per `cache` (the stages draw from the same images)."""
    size = batch_size or data_cfg.batch_size
    build = _builder(model_path, model_config, tokenizer, data_cfg.max_image_tokens)
    if size > 1:
        grids = _cached(cache, ("image_grids", model_path, data_cfg.max_image_tokens),
                        lambda: data.image_grids(build))
        samples = data.group_by_image_grid(samples, grids)
    batches = list(data.batches(samples, tokenizer, size, max_length=data_cfg.max_length,
                                lengths_per_doubling=data_cfg.lengths_per_doubling,
                                build=build))
    image_id = int(families.image_token_id(model_config))
    special = tuple(int(i) for i in data.special_token_ids(tokenizer, image_id))
    return Calibration(batches, image_id, special)


def _builder(model_path: str, model_config, tokenizer, max_image_tokens: int = 0):
    """The family's right-padded `build(conversations, images) -> batch` for calibration, each
    image at most `max_image_tokens` tokens (0: the checkpoint's own image settings)."""
    processors.check_image_token(model_config, tokenizer, f"the tokenizer of {model_path}")
    build = processors.batch_builder(
        model_config, tokenizer,
        processors.image_processor(model_config, model_path, max_image_tokens),
        pad_token_id=model_config.pad_token_id)
    return build or data.kimi_build(
        tokenizer, processors.kimi_image_config(model_path, max_image_tokens),
        model_config.pad_token_id)


def stage_draw(num_records: int, data_cfg, seed: int, stage: str) -> np.ndarray:
    """The records `stage` ("calibrate", "sensitivity" or "quantize") draws, in draw order."""
    n = int(data_cfg[dict(DRAWS)[stage]])
    order = data.draw_order(num_records, seed + SEED_OFFSETS[stage])
    return order if n <= 0 else order[:n]


def _calibration_draws(num_records: int, data_cfg, seed: int) -> np.ndarray:
    """`[num_records]` bool: the records some calibration stage's draw takes."""
    used = np.zeros(num_records, bool)
    for stage, _ in DRAWS:
        used[stage_draw(num_records, data_cfg, seed, stage)] = True
    return used


def heldout_indices(num_records: int, data_cfg, seed: int) -> np.ndarray:
    """Records no calibration draw takes, in the evaluate stage's seeded order."""
    used = _calibration_draws(num_records, data_cfg, seed)
    order = data.draw_order(num_records, seed + SEED_OFFSETS["evaluate"])
    return order[~used[order]]


def drawn_indices(num_records: int, data_cfg, seed: int, heldout_take: int) -> np.ndarray:
    """Every record some stage reads: the calibration draws and the first `heldout_take`
    held-out records (0: none, e.g. when a benchmark is scored instead)."""
    used = _calibration_draws(num_records, data_cfg, seed)
    used[heldout_indices(num_records, data_cfg, seed)[:heldout_take]] = True
    return np.flatnonzero(used)


def check_prompt_lengths(data_cfg, model_path: str, model_config, seed: int, heldout_take: int,
                         sizes: dict[int, tuple[tuple[int, int], ...]], cache: dict | None = None
                         ) -> None:
    """Every ShareGPT prompt a stage will build fits `data.max_length`, or a ValueError naming
    the longest: found before convert runs rather than by the stage whose batch is too long.

    Prompts are measured as the stages build them (human-only for the statistics draws, whole
    conversations for GPTQ's and the first `heldout_take` held-out records) from the image sizes
    `sizes` (record index -> each image's (width, height), `data.image_sizes`), no image
    decoded."""
    started = time.perf_counter()
    records = sharegpt_records(data_cfg, cache)
    n = len(records)
    human, whole = set(), set(heldout_indices(n, data_cfg, seed)[:heldout_take].tolist())
    for stage, _ in DRAWS:
        (whole if stage == "quantize" else human).update(
            stage_draw(n, data_cfg, seed, stage).tolist())
    forms = [(i, True) for i in sorted(human)] + [(i, False) for i in sorted(whole)]
    samples = [data.record_sample(records[i], data_cfg.image_dir, human_only=h) for i, h in forms]
    _note_late_images(records, forms, samples)
    build = _builder(model_path, model_config, checkpoint_tokenizer(model_path, cache),
                     data_cfg.max_image_tokens)
    used = [sizes[i][:len(s.images)] for (i, _), s in zip(forms, samples, strict=True)]
    names = [f"image record {i} (id {records[i].get('id', '?')!r})" for i, _ in forms]
    lengths = data.prompt_lengths(samples, used, build, names)
    over = np.flatnonzero(lengths > data_cfg.max_length)
    if over.size:
        worst = int(over[np.argmax(lengths[over])])
        i, human_only = forms[worst]
        form = "prompt" if human_only else "whole conversation"
        shown = ", ".join(f"{w}x{h}" for w, h in used[worst])
        shown = f", image{'s' * (len(used[worst]) > 1)} {shown}" if shown else ""
        count = len({forms[j][0] for j in over})
        raise ValueError(
            f"{count} calibration record(s) are longer than data.max_length={data_cfg.max_length} "
            f"tokens (prompts are never cut); the longest is the {form} of image record {i} "
            f"(id {records[i].get('id', '?')!r}{shown}): {lengths[worst]} tokens. Raise "
            f"--config.data.max_length to at least {lengths.max()} or cap each image's tokens "
            "with --config.data.max_image_tokens")
    if len(lengths):
        log.info("%d calibration prompts fit data.max_length=%d (longest %d tokens; %.1f s)",
                 len(lengths), data_cfg.max_length, lengths.max(), time.perf_counter() - started)


def _note_late_images(records, forms, samples) -> None:
    """Statistics prompts are a record's first user turn (method.md); a record whose <image>
    placeholders stand in later turns gives them fewer images, or none: say so, once."""
    kept = [(i, len(s.images), len(data.image_paths(records[i])))
            for (i, human_only), s in zip(forms, samples, strict=True) if human_only]
    late = [(i, got, has) for i, got, has in kept if got < has]
    if late:
        i, got, has = late[0]
        log.warning(
            "%d of the %d statistics prompts hold fewer images than their record (%d none): "
            "statistics read a record's first user turn, and these records' <image> "
            "placeholders stand in later turns, e.g. image record %d (id %r), %d of its %d "
            "images", len(late), len(kept), sum(g == 0 for _, g, _ in late), i,
            records[i].get("id", "?"), got, has)


def heldout(data_cfg, model_path: str, model_config, n: int, seed: int,
            cache: dict | None = None) -> Calibration:
    """Whole held-out ShareGPT conversations (`n`, 0 = DEFAULT_HELDOUT_CONVERSATIONS at most),
    one per batch: what the evaluate stage scores when no benchmark is given. One at a time
    because scoring holds two `[rows, T, vocab]` float32 logit arrays: about 1 GB each for one
    1500-token conversation at Kimi-VL's 163,840-token vocabulary."""
    records = sharegpt_records(data_cfg, cache)
    left = heldout_indices(len(records), data_cfg, seed)
    if not len(left):
        raise ValueError(heldout_error(len(records), data_cfg))
    take = left[:n or DEFAULT_HELDOUT_CONVERSATIONS]
    samples = [data.record_sample(records[i], data_cfg.image_dir, human_only=False)
               for i in take]
    return _calibration(samples, data_cfg, model_path, model_config,
                        checkpoint_tokenizer(model_path, cache), batch_size=1)


def heldout_error(num_records: int, data_cfg) -> str:
    counts = ", ".join(f"data.{f}={data_cfg[f]}" for _, f in DRAWS)
    return (f"all {num_records} image records of {data_cfg.calib_json} are drawn for calibration "
            f"({counts}; 0 = all): none is left to evaluate on. Add records, lower those "
            "counts, or score a benchmark with --config.eval.jsonl")


def testbed_samples(n: int, seed: int, purpose: str, checkpoint: str | None = None,
                    stats_tasks: str = "vision") -> list[data.Sample]:
    """Training-split samples of the suite `checkpoint` was trained on (its recorded task
    settings; the defaults without one): prompts for statistics, whole conversations of both
    families for GPTQ. Statistics see vision prompts only (`stats_tasks="vision"`, as the
    reference calibrates on image + instruction prompts) or every task (`"all"`, so experts
    that serve text-only questions are measured too)."""
    from mode_jax.testbed import tasks  # the synthetic suite only matters for this source

    if stats_tasks not in STATS_TASKS:
        raise ValueError(f"data.testbed_stats_tasks={stats_tasks!r}; allowed: "
                         f"{', '.join(STATS_TASKS)}")
    suite = tasks.recorded_config(checkpoint) if checkpoint else tasks.TaskConfig()
    if purpose == "stats":
        cfg = suite if stats_tasks == "all" else dataclasses.replace(suite,
                                                                     tasks=tasks.VISION_TASKS)
        return [data.Sample(tuple(s.messages()), (s.image,) if s.image is not None else (),
                            s.family) for s in tasks.generate("train", n, seed, cfg)]
    out = []
    for s in tasks.generate("train", n, seed, suite):
        messages = (*s.messages(), {"role": "assistant", "content": s.answer})
        out.append(data.Sample(messages, (s.image,) if s.image is not None else (), s.family))
    return out


def random_batches(model_config, n: int, batch_size: int, seed: int,
                   grid: tuple[int, int] = (4, 4), text_len: int = 12) -> list[dict]:
    """`n` samples: 2 text tokens, one image's placeholders (a `grid` of patches), `text_len`
    text tokens; images in the model family's processor format (`families.random_images`)."""
    rng = np.random.default_rng(seed)
    vocab, image_token_id = model_config.text.vocab_size, families.image_token_id(model_config)
    n_img = families.image_tokens(model_config, grid)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = rng.integers(0, vocab, size=(b, 2 + n_img + text_len)).astype(np.int32)
        ids[ids == image_token_id] = (image_token_id + 1) % vocab
        ids[:, 2:2 + n_img] = image_token_id
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                    **families.random_images(model_config, b, rng, grid)})
    return out
