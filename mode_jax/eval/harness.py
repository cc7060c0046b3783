"""Score any model the project builds (full precision, fake-quantized, packed) on a question set.

    data = harness.encode(tasks.generate("heldout", 1000, seed=0), tokenizer)   # or load_jsonl
    full = harness.evaluate(model, data)
    quant = harness.evaluate(quantized_model, data, reference=full)
    print(harness.format_table(quant))

`model` is any model family's wrapper (`model(batch)`, `prepare`, `embed_inputs`,
`language_model`: Kimi-VL, Qwen3-VL-MoE or InternVL). `encode` builds Kimi-VL prompts and images
by default, another family's when given its batch builder (`processors.batch_builder`: the
checkpoint's chat template and image processor).
Per sample the harness runs
- greedy generation with the KV cache (`eval.generate`) -> exact-match accuracy of the decoded
  answer (`metrics.exact_match`);
- one teacher-forced pass over prompt + answer + `<|im_end|>` -> negative log-likelihood of the
  answer tokens (perplexity), KL(reference || model) of the next-token distributions at the
  answer positions, and for multiple-choice samples the option with the highest
  log-likelihood after the prompt (multiple-choice accuracy): the option letters when the
  answer is a letter (MMBench style), else the options themselves (cloze style);
- optionally (`routing=True`) per-MoE-layer expert counts of image and text tokens.
Every metric comes as `{"all": x, "family": {...}, "task": {...}, "modality": {...}}`.

Batches hold one kind of sample (same image grids) sorted by length, padded on the left to a
multiple of 16 tokens, one of `lengths_per_doubling` lengths per doubling
(`calib.data.padded_length`), and to `batch_size` rows (by repeating the last sample, dropped
after), so a whole held-out split compiles only a few shapes. A small split (every kind fits in half
of `batch_size`) gets the smallest such halving of it as its batch, not rows of repeats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mode_jax import progress
from mode_jax.calib.data import LENGTHS_PER_DOUBLING, padded_length
from mode_jax.convert import families
from mode_jax.eval import generate, jsonl, metrics
from mode_jax.preprocess import ImageConfig, preprocess_image, prompt_text
from mode_jax.testbed import tasks
from mode_jax.testbed import tokenizer as tok_lib

log = logging.getLogger(__name__)

GROUPINGS = ("family", "task", "modality")


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded question: prompt ids `[Tp]`, answer ids `[Ta]` (answer + `<|im_end|>`), its
    images' pixel rows, concatenated in prompt order (or None), and one grid per image:
    `[h * w, 3, p, p]` and (h, w) for Kimi-VL, `[t * h * w, C * T * p * p]` and (t, h, w) for
    Qwen3-VL, `[n, 3, S, S]` tiles and (n,) for InternVL; the token id of each option's
    letter or, when the answer is the option itself, of the option (MC)."""

    sample: tasks.Sample
    prompt_ids: np.ndarray
    answer_ids: np.ndarray
    pixel_values: np.ndarray | None
    grids: tuple[tuple[int, ...], ...]
    option_ids: tuple[int, ...] = ()

    @property
    def grid(self) -> tuple[int, ...] | None:
        """The grid of the example's one image (None without images)."""
        if len(self.grids) > 1:
            raise ValueError(f"example {self.sample.key!r} has {len(self.grids)} images; "
                             "use .grids")
        return self.grids[0] if self.grids else None


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Encoded examples plus what decoding needs: generation also stops at `stop_token_ids`
    (`generation_stop_ids`: the checkpoint's other end tokens)."""

    examples: tuple[Example, ...]
    tokenizer: Any
    eos_token_id: int
    pad_token_id: int
    stop_token_ids: tuple[int, ...] = ()


def generation_stop_ids(checkpoint: str | Path) -> tuple[int, ...]:
    """The end tokens of the checkpoint's generation_config.json (`eos_token_id`, one id or a
    list; Qwen3-VL lists `<|im_end|>` and `<|endoftext|>`), or () without the file."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        ids = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path} could not be read: {err}") from None
    ids = [ids] if isinstance(ids, int) else ids if ids is not None else []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {ids!r}")
    return tuple(ids)


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} encodes to {len(ids)} tokens {ids}; multiple-choice "
                         "scoring needs one token per option letter (or per option, when "
                         "questions are answered by the option itself)")
    return int(ids[0])


def option_token_ids(tokenizer, sample: tasks.Sample) -> tuple[int, ...]:
    """What multiple-choice scoring compares: the letters, or the options when the answer is
    an option's text."""
    if not sample.options:
        return ()
    if sample.answer == tasks.LETTERS[sample.answer_index]:
        return tuple(_single_token(tokenizer, tasks.LETTERS[i], "option letter")
                     for i in range(len(sample.options)))
    return tuple(_single_token(tokenizer, o, "option") for o in sample.options)


def encode(samples: Sequence[tasks.Sample], tokenizer, image_cfg: ImageConfig | None = None,
           build=None) -> EvalSet:
    """Tokenize `samples` (images where `sample.messages()` puts them) and cut their images
    (`image_cfg`: MoonViT preprocessing, default Kimi-VL's; with `build`, a family's batch
    builder from `processors.batch_builder`, its chat template and image processor instead).
    Kimi-VL prompts are the tokenizer's chat template over `sample.messages()` (Kimi-VL's
    template by hand when it has none; for the testbed, the same text as `sample.prompt`)."""
    image_cfg = image_cfg or ImageConfig()
    if not samples:
        raise ValueError("no samples to evaluate")
    eos = _single_token(tokenizer, tok_lib.IM_END, "end token")
    if build is not None:
        return _encode_built(samples, tokenizer, build, eos)
    examples = []
    for s in samples:
        cut = [preprocess_image(image, image_cfg) for image in s.images]
        pixels = np.concatenate([p for p, _ in cut]) if cut else None
        grids = tuple((int(g[0]), int(g[1])) for _, g in cut)
        prompt = prompt_text(s.messages(), tokenizer)  # the checkpoint's own chat template
        ids, answer = tok_lib.encode_example(tokenizer, prompt, s.answer,
                                             list(grids) if grids else None)
        examples.append(Example(s, ids[~answer], ids[answer], pixels, grids,
                                option_token_ids(tokenizer, s)))
    return EvalSet(tuple(examples), tokenizer, eos, int(tokenizer.pad_token_id or 0))


def _encode_built(samples, tokenizer, build, eos: int) -> EvalSet:
    """`encode` with a family's batch builder: prompt = the chat template over (image,
    question) with the generation prompt, answer = its tokens + `<|im_end|>`."""
    from mode_jax import processors

    examples = []
    for s in samples:
        # the question itself: `s.prompt` is already in Kimi-VL's chat format
        batch = build([s.messages()], [list(s.images)])
        pixels = batch.get("pixel_values")
        grids = tuple(processors.image_grid(batch, i) for i in range(len(s.images)))
        answer = tokenizer(s.answer, add_special_tokens=False)["input_ids"]
        if not answer:
            raise ValueError(f"answer {s.answer!r} encodes to no tokens")
        examples.append(Example(s, batch["input_ids"][0], np.asarray([*answer, eos], np.int32),
                                pixels, grids, option_token_ids(tokenizer, s)))
    return EvalSet(tuple(examples), tokenizer, eos, int(tokenizer.pad_token_id or 0))


def load_jsonl(path: str | Path, tokenizer, image_cfg: ImageConfig | None = None,
               build=None, items=None) -> EvalSet:
    """A user benchmark (format in `eval.jsonl`) as an EvalSet; bad lines raise, naming them.
    `items`: the file's `jsonl.read_benchmark` result when the caller has read it already."""
    items = jsonl.read_benchmark(path) if items is None else items
    data = encode([jsonl.to_sample(item) for item in items], tokenizer, image_cfg, build)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        lost = [ex.sample.answer for ex in data.examples if unk in ex.answer_ids]
        if lost:
            log.warning("%s: %d of %d answers hold words the tokenizer does not know (e.g. %r); "
                        "they encode to its unknown token and cannot be generated exactly",
                        path, len(lost), len(data.examples), lost[0])
    return data


# ---------------------------------------------------------------- batching
def _kinds(data: EvalSet) -> dict[Any, list[int]]:
    """Example indices per kind of sample (its image grids)."""
    groups: dict[Any, list[int]] = {}
    for i, ex in enumerate(data.examples):
        groups.setdefault(ex.grids, []).append(i)
    return groups


def _batches(data: EvalSet, batch_size: int) -> list[list[int]]:
    """Example indices per batch: same image grids, similar length."""
    groups = _kinds(data)
    out = []
    for key in sorted(groups, key=str):
        idx = sorted(groups[key], key=lambda i: len(data.examples[i].prompt_ids))
        out += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    return out


def _rows_per_batch(data: EvalSet, batch_size: int) -> int:
    """`batch_size`, halved while half still holds the largest kind of example: a small set
    (a smoke run, a test) is not padded to 32 rows of repeats. Halving keeps the row count a
    divisor of `batch_size`, so a mesh axis that splits those rows splits these too (down to
    sets smaller than the axis, which run replicated)."""
    largest = max(map(len, _kinds(data).values()), default=1)
    while batch_size % 2 == 0 and batch_size // 2 >= largest:
        batch_size //= 2
    return batch_size


def _model_batch(data: EvalSet, rows: list[int], with_answer: bool,
                 lengths_per_doubling: int = LENGTHS_PER_DOUBLING) -> dict[str, np.ndarray]:
    examples = [data.examples[i] for i in rows]
    seqs = [np.concatenate([e.prompt_ids, e.answer_ids]) if with_answer else e.prompt_ids
            for e in examples]
    ids, mask = generate.pad_left(seqs, data.pad_token_id,
                                  padded_length(max(len(s) for s in seqs), 16,
                                                lengths_per_doubling))
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].grids:
        batch["pixel_values"] = np.concatenate([e.pixel_values for e in examples])
        grids = np.asarray([g for e in examples for g in e.grids], np.int64)
        key = {1: "image_num_patches", 2: "image_grid_hws", 3: "image_grid_thw"}[grids.shape[1]]
        batch[key] = grids.reshape(-1) if grids.shape[1] == 1 else grids
    return batch


# ---------------------------------------------------------------- one pass
def _teacher_forced(model, data, rows, batch, reference, routing, k):
    """Per-row NLL sums/counts, KL sums, MC choice, answer log-probs; routing counts of the
    first `k` rows (the rest repeat a sample to fill the batch). Answers end every row, so
    only the last `t` positions' logits are computed (`logits_window`): the longest answer and
    the position before it, never a `[B, T, vocab]` array."""
    t = 1 + max(len(data.examples[i].answer_ids) for i in rows)
    out = model(batch, return_routing=routing, logits_window=t)
    logits = out.logits
    ids = batch["input_ids"][:, -t:]
    target = np.zeros(ids.shape, bool)
    for b, i in enumerate(rows):
        target[b, t - len(data.examples[i].answer_ids):] = True
    nll, count = metrics.answer_nll(logits, ids, target)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    res: dict[str, Any] = {"nll": np.asarray(nll), "count": np.asarray(count), "kl": None,
                           "choice": [], "logprobs": [], "routing": None}
    if callable(reference):
        res["kl"] = np.asarray(metrics.answer_kl(reference(batch, logits_window=t).logits,
                                                 logits, target)[0])
    for b, i in enumerate(rows):
        ex = data.examples[i]
        n = len(ex.answer_ids)
        lp = logp[b, t - n - 1:t - 1]  # [n, V]: the distributions predicting the answer
        res["logprobs"].append(lp)
        res["choice"].append(int(np.argmax(lp[0, list(ex.option_ids)])) if ex.option_ids
                             else None)
    if isinstance(reference, dict):
        res["kl"] = np.asarray([_kl(reference["answer_logprobs"][i], lp)
                                for i, lp in zip(rows, res["logprobs"], strict=True)])
    if routing:
        res["routing"] = _routing_counts(out.routing, batch, model.config, k)
    return res


def digest(data: EvalSet) -> str:
    """A short hash of the encoded questions and answers: results with equal digests were
    scored on the same samples in the same order, so they can be compared sample by sample."""
    h = hashlib.sha256()
    for ex in data.examples:
        for ids in (ex.prompt_ids, ex.answer_ids):
            h.update(np.asarray(ids, np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def _kl(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    if ref_logp.shape != logp.shape:
        raise ValueError(f"reference answer log-probs {ref_logp.shape} do not match {logp.shape}: "
                         "was the reference evaluated on the same data?")
    p = np.exp(ref_logp.astype(np.float64))
    return float(np.sum(np.where(p > 0, p * (ref_logp - logp), 0.0)))


def _routing_counts(routing, batch, config, k) -> np.ndarray:
    """[2, L_moe, E] int64: expert picks of image tokens (0) and other real tokens (1), rows
    `[:k]`."""
    real = np.asarray(batch["attention_mask"])[:k].astype(bool)
    image = real & (np.asarray(batch["input_ids"])[:k] == families.image_token_id(config))
    e = config.text.n_routed_experts
    out = np.zeros((2, len(routing), e), np.int64)
    for layer, (ids, _) in enumerate(routing):
        ids = np.asarray(ids)[:k]
        for m, where in enumerate((image, real & ~image)):
            out[m, layer] = np.bincount(ids[where].reshape(-1), minlength=e)
    return out


# ---------------------------------------------------------------- the evaluation
def evaluate(model, data: EvalSet, *, reference=None, batch_size: int = 32,
             max_new_tokens: int = 8, routing: bool = False, keep_logprobs: bool = True,
             lengths_per_doubling: int = LENGTHS_PER_DOUBLING) -> dict:
    """Score `model` on `data`; returns a plain dict (see the module doc).

    reference: None, a model (run on every batch) or the result of an earlier `evaluate` of
    the reference model on the same data (its stored answer log-probs): adds "kl".
    lengths_per_doubling: padded lengths per doubling (`calib.data.padded_length`; 0: every
    multiple of 16).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(reference, dict):
        if "answer_logprobs" not in reference:
            raise ValueError("reference result has no 'answer_logprobs' (evaluate it with "
                             "keep_logprobs=True)")
        if len(reference["answer_logprobs"]) != len(data.examples):
            raise ValueError(f"reference result covers {len(reference['answer_logprobs'])} "
                             f"samples, the data {len(data.examples)}: not the same data")
    start = time.perf_counter()
    n = len(data.examples)
    preds: list[str] = [""] * n
    nll, count, kl = np.zeros(n), np.zeros(n), np.zeros(n)
    choice: list[int | None] = [None] * n
    logprobs: list[np.ndarray | None] = [None] * n
    route = None
    batch_size = _rows_per_batch(data, batch_size)
    for rows in progress.track(_batches(data, batch_size), "evaluation batches"):
        filled = rows + [rows[-1]] * (batch_size - len(rows))  # one shape per kind
        k = len(rows)
        res = _teacher_forced(model, data, filled,
                              _model_batch(data, filled, True, lengths_per_doubling), reference,
                              routing, k)
        gen = generate.greedy_generate(model, _model_batch(data, filled, False,
                                                           lengths_per_doubling), max_new_tokens,
                                       data.eos_token_id, stop_token_ids=data.stop_token_ids)
        texts = generate.decode(data.tokenizer, gen)
        for j, i in enumerate(rows):
            preds[i], choice[i] = texts[j], res["choice"][j]
            nll[i], count[i] = res["nll"][j], res["count"][j]
            logprobs[i] = res["logprobs"][j] if keep_logprobs else None
            if res["kl"] is not None:
                kl[i] = res["kl"][j]
        if routing:
            route = res["routing"] if route is None else route + res["routing"]
    return _assemble(data, preds, nll, count, kl if reference is not None else None, choice,
                     logprobs if keep_logprobs else None, route, time.perf_counter() - start)


def sample_groups(samples: Sequence[tasks.Sample]) -> dict[str, list[str]]:
    """Each sample's label under each grouping (family, task, modality)."""
    return {g: [getattr(s, g) for s in samples] for g in GROUPINGS}


def accuracies(samples: Sequence[tasks.Sample], correct, choices) -> dict:
    """Per-group exact-match accuracy and, when some samples are multiple choice, their
    multiple-choice accuracy, from per-sample outcomes (`correct`, `choices`: an option index
    or None): how an evaluation totals them, and how a stored record of them is re-totalled."""
    groups = sample_groups(samples)
    out = {"accuracy": metrics.breakdown(np.asarray(correct, float), np.ones(len(samples)),
                                         groups)}
    mc = [i for i, c in enumerate(choices) if c is not None]
    if mc:
        hits = np.asarray([choices[i] == samples[i].answer_index for i in mc], float)
        out["mc_accuracy"] = metrics.breakdown(
            hits, np.ones(len(mc)), {k: [v[i] for i in mc] for k, v in groups.items()})
    return out


def _assemble(data, preds, nll, count, kl, choice, logprobs, route, seconds) -> dict:
    samples = [e.sample for e in data.examples]
    groups = sample_groups(samples)
    correct = metrics.exact_match(preds, [s.answer for s in samples])
    totals = accuracies(samples, correct, choice)
    result: dict[str, Any] = {
        "n": len(samples),
        "accuracy": totals["accuracy"],
        "nll": metrics.breakdown(nll, count, groups),
        "wall_seconds": seconds,
        "predictions": preds,
        "correct": correct.tolist(),
        "choices": list(choice),  # per sample: the option scored highest (None: not MC)
        "answer_tokens": np.asarray(count, np.float64).tolist(),
    }
    result["perplexity"] = _map(result["nll"], np.exp)
    if "mc_accuracy" in totals:
        result["mc_accuracy"] = totals["mc_accuracy"]
    if kl is not None:
        result["kl"] = metrics.breakdown(kl, count, groups)
        result["sample_kl"] = np.asarray(kl, np.float64).tolist()  # summed over answer tokens
    if logprobs is not None:
        result["answer_logprobs"] = logprobs
    if route is not None:
        result["routing"] = {"image": route[0], "text": route[1]}
    return result


def _map(tree, fn):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return float(fn(tree))


# ---------------------------------------------------------------- reporting
def summary(result: dict) -> dict:
    """The JSON-friendly part of a result: metrics, counts as lists, no per-sample arrays."""
    keep = ("n", "accuracy", "mc_accuracy", "perplexity", "kl", "wall_seconds")
    out = {k: result[k] for k in keep if k in result}
    if "routing" in result:
        out["routing"] = {k: v.tolist() for k, v in result["routing"].items()}
    return out


def format_table(result: dict, title: str = "") -> str:
    """One row per group (all, each family, task, modality); accuracy in percent."""
    cols = [("accuracy", "exact %", 100.0), ("mc_accuracy", "choice %", 100.0),
            ("perplexity", "ppl", 1.0), ("kl", "KL", 1.0)]
    cols = [c for c in cols if c[0] in result]
    rows = [("all", lambda m: m["all"])]
    for g in GROUPINGS:
        for label in result["accuracy"][g]:
            rows.append((f"{g}={label}", lambda m, g=g, label=label: m.get(g, {}).get(label)))
    header = f"{'group':<24}" + "".join(f"{name:>10}" for _, name, _ in cols)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for label, get in rows:
        cells = []
        for key, _, scale in cols:
            v = get(result[key])
            cells.append(f"{'-':>10}" if v is None or np.isnan(v) else f"{v * scale:>10.3f}")
        lines.append(f"{label:<24}" + "".join(cells))
    lines.append(f"{result['n']} samples, {result['wall_seconds']:.1f} s")
    return "\n".join(lines)


def routing_divergence(counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
    """[L] Jensen-Shannon divergence (bits, in [0, 1]) between two [L, E] count tables' rows."""
    p = np.asarray(counts_a, np.float64)
    q = np.asarray(counts_b, np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"count tables must be equal [L, E] arrays, got {p.shape}, {q.shape}")
    p = p / np.maximum(p.sum(-1, keepdims=True), 1)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1)
    m = (p + q) / 2

    def kl(a, b):
        return np.sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)),
                               0.0), axis=-1)

    return (kl(p, m) + kl(q, m)) / 2

