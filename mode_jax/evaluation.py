"""The evaluate stage's scoring: the quantized model against the full-precision one.

What is scored depends on the data at hand:
- a user benchmark (`eval.jsonl`) or the testbed's held-out split (`data.source == "testbed"`):
  exact-match and multiple-choice accuracy, perplexity and KL(full || quantized) on the answer
  positions, per task family / task / modality (mode_jax.eval.harness);
- ShareGPT calibration data (`data.source == "sharegpt"`, no benchmark): KL and perplexity of
  the next-token distributions over the text positions (image placeholders are not targets) of
  whole held-out conversations, the records no calibration draw took (`sources.heldout`;
  `eval.num_samples` of them, 0 = up to 256);
- otherwise (random tokens, a checkpoint without tokenizer): the same over every real position
  of seeded random prompts.
The full-precision result is computed once per process and shared by every method of a sweep.

Besides the aggregate metrics, `evaluate` returns per-sample arrays (what the report's paired
bootstrap intervals need, `eval.bootstrap`): `kl` [n] KL summed over each sample's scored
positions, `kl_tokens` [n] how many positions that is, and, where answers are scored, `correct`
[n] (1 = exact match) and `family` [n] (index into `metrics["families"]`, e.g. text / vision).
`metrics["eval_digest"]` names the samples (equal digests = same samples in the same order).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

DEFAULT_HELDOUT = 400  # eval.num_samples = 0 on the testbed


def evaluate(ctx, fp_model, q_model) -> tuple[dict, dict, dict]:
    """(flat metrics for the report, per-group tables, per-sample arrays) of `q_model`."""
    c = ctx.config
    if c.eval.jsonl or c.data.source == "testbed":
        return _harness(ctx, fp_model, q_model)
    return _next_token(fp_model, q_model, *_next_token_batches(ctx, fp_model.config))


def _eval_set(ctx, model_config=None):
    from mode_jax import preprocess
    from mode_jax.calib import sources
    from mode_jax.eval import harness

    c = ctx.config
    tokenizer = sources.tokenizer(c.model.path, ctx.cache)
    if tokenizer is None:
        raise ValueError(f"{c.model.path} has no tokenizer: accuracy needs one (eval.jsonl or "
                         "the testbed)")
    build = None
    if model_config is not None:
        from mode_jax import processors

        processors.check_image_token(model_config, tokenizer, f"the tokenizer of {c.model.path}")
        build = processors.batch_builder(model_config, tokenizer, processors.image_processor(
            model_config, c.model.path), pad_token_id=model_config.pad_token_id)
    image_cfg = preprocess.ImageConfig.from_checkpoint(c.model.path)  # Kimi-VL's settings
    if c.eval.jsonl:
        data = harness.load_jsonl(c.eval.jsonl, tokenizer, image_cfg, build=build,
                                  items=sources.benchmark(c.eval.jsonl, ctx.cache))
    else:
        from mode_jax.testbed import tasks

        n = c.eval.num_samples or DEFAULT_HELDOUT
        suite = tasks.recorded_config(c.model.path)  # the suite the checkpoint learned
        data = harness.encode(tasks.generate("heldout", n, seed=c.seed, config=suite),
                              tokenizer, image_cfg, build=build)
    return dataclasses.replace(data, stop_token_ids=harness.generation_stop_ids(c.model.path))


def _harness(ctx, fp_model, q_model):
    from mode_jax.eval import harness

    c = ctx.config
    key = ("fp_eval", c.eval.jsonl, c.eval.num_samples, c.seed)
    if key not in ctx.cache:
        data = _eval_set(ctx, fp_model.config)
        ctx.cache[key] = (data, harness.evaluate(
            fp_model, data, batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
            lengths_per_doubling=c.data.lengths_per_doubling))
    data, full = ctx.cache[key]
    res = harness.evaluate(q_model, data, reference=full, batch_size=c.eval.batch_size,
                           max_new_tokens=c.eval.max_new_tokens, keep_logprobs=False,
                           lengths_per_doubling=c.data.lengths_per_doubling)
    metrics = {
        "accuracy": res["accuracy"]["all"],
        "fp_accuracy": full["accuracy"]["all"],
        "kl": res["kl"]["all"],
        "perplexity": res["perplexity"]["all"],
        "n": res["n"],
        "eval_digest": harness.digest(data),
    }
    for family, acc in res["accuracy"]["family"].items():
        metrics[f"accuracy_{family}"] = acc
        metrics[f"fp_accuracy_{family}"] = full["accuracy"]["family"][family]
    tables = {"quantized": harness.format_table(res), "full_precision": harness.format_table(full)}
    families = [ex.sample.family for ex in data.examples]
    metrics["families"] = sorted(set(families))
    per_sample = {"correct": np.asarray(res["correct"], np.int8),
                  "kl": np.asarray(res["sample_kl"], np.float64),
                  "kl_tokens": np.asarray(res["answer_tokens"], np.float64),
                  "family": np.asarray([metrics["families"].index(f) for f in families], np.int8)}
    return metrics, tables, per_sample


def _next_token_batches(ctx, model_config) -> tuple[list[dict], int | None]:
    """(batches, image token id to leave out of the targets, or None to score every position)."""
    from mode_jax.calib import sources

    c = ctx.config
    if c.data.source == "sharegpt":
        held = sources.heldout(c.data, c.model.path, model_config, c.eval.num_samples, c.seed,
                               ctx.cache)
        return held.batches, held.image_token_id
    return sources.random_batches(model_config, c.eval.num_samples or 8, c.data.batch_size,
                                  c.seed + sources.SEED_OFFSETS["evaluate"]), None


def _next_token(fp_model, q_model, batches, image_token_id):
    import jax

    from mode_jax.eval import metrics as m

    kl_rows, n_rows, nll_sum = [], [], 0.0
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(np.asarray(batch["input_ids"], np.int64).tobytes())
        ref = fp_model(batch).logits
        out = q_model(batch).logits
        mask = np.asarray(batch["attention_mask"]).astype(bool).copy()
        if image_token_id is not None:
            mask &= np.asarray(batch["input_ids"]) != image_token_id
        mask[:, 0] = False  # position t is predicted by t - 1
        s, k = m.answer_kl(ref, out, mask)
        nll, _ = m.answer_nll(out, batch["input_ids"], mask)
        kl_rows.append(np.asarray(s, np.float64))
        n_rows.append(np.asarray(k, np.float64))
        nll_sum += float(jax.numpy.sum(nll))
    kl, tokens = np.concatenate(kl_rows), np.concatenate(n_rows)
    metrics = {"kl": float(kl.sum() / tokens.sum()),
               "perplexity": float(np.exp(nll_sum / tokens.sum())), "n": len(kl),
               "eval_digest": digest.hexdigest()[:16]}
    return metrics, {}, {"kl": kl, "kl_tokens": tokens}
