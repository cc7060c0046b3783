"""The pipeline: convert -> calibrate -> sensitivity -> allocate -> quantize -> evaluate.

Each stage is a function `(ctx, inputs) -> (arrays, meta)` whose output `mode_jax.runner` stores
under `<workdir>/<stage>/<fingerprint>/` (see runner.py for resuming and reuse). The artifacts:
- convert:     `params` {dotted NNX path: array}; meta `config_json` (the checkpoint's config)
- calibrate:   `count_{all,text,image,key,redundant}` [L_moe, E], `weight_sum_all`, token counts
- sensitivity: `bits` [B], `delta_{text,vision}` [L_moe, E, B], every estimator under its name,
               `pmq_err`, `gemq_cost` [L_moe, E, B], `hessian_trace` [L_moe, E]
- allocate:    `bits` [L_moe, E] int32; meta: the solver report, average bits, histogram
- quantize:    the packed model (quant/serialize.py layout); meta: the quantization report
- evaluate:    metrics; meta: the evaluation table
A sweep (`config.sweep`) runs allocate..evaluate per method on the same statistics.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax import runner
from mode_jax.alloc.allocators import METHODS, MODE_KEYS
from mode_jax.runner import Stage, UserError
from pallas_kernels import packing
from pallas_kernels.grouped_matmul import DEQUANT_MODES as KERNEL_DEQUANT_MODES

log = logging.getLogger(__name__)
USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MATMUL_PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "default", "bfloat16")
FREQ_KEYS = tuple(MODE_KEYS)
MAX_NEW_TOKENS = 4096  # eval.max_new_tokens: the generation cache is sized by it


# ---------------------------------------------------------------- model access


def model_from_artifact(ctx: runner.Context, art: runner.Artifact):
    """The full-precision model rebuilt from the convert artifact (no PyTorch, no safetensors)."""
    if "fp_model" not in ctx.cache:
        from mode_jax.convert import families, mapping

        raw = art.meta["config_json"]
        family = families.for_model_type(raw.get("model_type"), source=art.path)
        config = family.config_from_json(raw, source=art.path)
        abstract = family.convert().abstract_model(config, DTYPES[ctx.config.model.dtype])
        ctx.cache["fp_model"] = place(ctx, mapping.load_into(abstract, art.arrays["params"]))
    return ctx.cache["fp_model"]


def place(ctx: runner.Context, model):
    """With several devices (or hosts), split the experts over a mesh (mode_jax.sharding)."""
    if jax.device_count() > 1:
        from mode_jax import sharding

        sharding.shard_model(model, sharding.make_mesh(expert=ctx.config.mesh.expert))
    return model


def calibration(ctx: runner.Context, model, n: int, purpose: str, stage: str):
    """`stage`'s calibration records (each stage draws with its own seed)."""
    from mode_jax.calib import sources

    c = ctx.config
    return sources.load(c.data, c.model.path, model.config, n,
                        c.seed + sources.SEED_OFFSETS[stage], purpose, ctx.cache)


def stats_config(ctx: runner.Context, calib):
    from mode_jax.calib import passes

    s = ctx.config.stats
    return passes.StatsConfig(
        image_token_id=calib.image_token_id,
        special_token_ids=calib.special_token_ids,
        key_ratio=s.key_ratio,
        attention_mode=s.attention_mode,
        judge_layer=s.judge_layer,
    )


# ---------------------------------------------------------------- stages


def run_convert(ctx, inputs):
    from mode_jax.convert import families, mapping, safetensors_io

    path = ctx.config.model.path
    raw = safetensors_io.read_config(path)
    family = families.for_model_type(raw.get("model_type"), source=f"{path}/config.json")
    model = family.convert().from_directory(path, param_dtype=DTYPES[ctx.config.model.dtype])
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    params = {mapping.path_str(p): np.asarray(v[...]) for p, v in flat}
    ctx.cache["fp_model"] = place(ctx, model)
    meta = {"config_json": safetensors_io.read_config(path), "source": os.path.abspath(path),
            "num_params": int(sum(a.size for a in params.values()))}
    return {"params": params}, meta


def run_calibrate(ctx, inputs):
    from mode_jax.calib import passes

    model = model_from_artifact(ctx, inputs["convert"])
    calib = calibration(ctx, model, ctx.config.data.num_freq_samples, "stats", "calibrate")
    stats = passes.frequency_pass(model, calib.batches, stats_config(ctx, calib))
    meta = {"num_batches": len(calib.batches),
            "tokens": {k: int(v) for k, v in stats.items() if k.startswith("num_tokens")}}
    return {k: np.asarray(v) for k, v in stats.items()}, meta


def run_sensitivity(ctx, inputs):
    from mode_jax.calib import passes

    c = ctx.config
    model = model_from_artifact(ctx, inputs["convert"])
    calib = calibration(ctx, model, c.data.num_sens_samples, "stats", "sensitivity")
    out = passes.sensitivity_pass(
        model, calib.batches, stats_config(ctx, calib), bits=np.asarray(c.alloc.bits),
        group_size=c.sens.group_size, estimator=c.sens.estimator, baselines=True,
        max_tokens=c.sens.max_tokens, num_probes=c.sens.hutchinson_probes, seed=c.seed,
        quantizer=c.sens.quantizer, curvature=c.sens.trace_curvature,
        trace_layers_per_pass=c.sens.trace_layers_per_pass,
        trace_batch_size=c.sens.trace_batch_size, kl_chunk=c.sens.kl_chunk,
    )
    meta = {"estimator": c.sens.estimator, "quantizer": c.sens.quantizer,
            "trace_curvature": c.sens.trace_curvature}
    return {k: np.asarray(v) for k, v in out.items()}, meta


def allocation_options(alloc) -> dict:
    """The allocator keyword arguments a method takes, from the `alloc` config section."""
    common = {"solver": alloc.solver}
    return {
        "uniform": {},
        "mode": {**common, "key": alloc.freq_key, "vision_mix": alloc.vision_mix,
                 "scope": alloc.scope, "equality": alloc.equality},
        "pmq": {**common, "a": alloc.pmq_a, "b": alloc.pmq_b},
        "gemq": {**common, "scope": "global", "equality": alloc.equality},
        "mopeq": {"scope": alloc.mopeq_scope},
        "mopeq-budget": {**common, "scope": alloc.mopeq_scope, "equality": alloc.equality},
        "random": {**common, "seed": alloc.random_seed, "scope": alloc.scope,
                   "equality": alloc.equality},
    }[alloc.method]


def run_allocate(ctx, inputs):
    from mode_jax.alloc import allocators, bitmap

    a = ctx.config.alloc
    bits, report = allocators.allocate(
        a.method, inputs["calibrate"].arrays, inputs["sensitivity"].arrays, a.budget_bits,
        **allocation_options(a),
    )
    bits = np.asarray(bits, np.int32)
    return {"bits": bits}, {"report": report, "summary": bitmap.summary(bits)}


def run_quantize(ctx, inputs):
    from mode_jax.quant import apply, router_finetune, serialize

    c = ctx.config
    model = model_from_artifact(ctx, inputs["convert"])
    bits = inputs["allocate"].arrays["bits"]
    qconfig = apply.QuantConfig.from_config(c.quant)
    batches = []
    if qconfig.method == "gptq" or c.quant.router_finetune:
        batches = calibration(ctx, model, c.data.num_gptq_samples, "gptq", "quantize").batches
    qmodel, report = apply.quantize_model(model, batches, bits, qconfig)
    for line in apply.notes(report):  # the report recomputes them from quant_report
        log.warning("quantize: %s", line)
    if c.quant.router_finetune:
        report["router_finetune"] = router_finetune.finetune_routers(qmodel, batches)
    arrays, meta = serialize.to_artifact(qmodel, {"quant_report": report})
    meta["nbytes"] = serialize.theoretical_nbytes(qmodel)
    # On the mesh like a restored one: packed experts split over "expert", batches over "data".
    ctx.cache[("quantized", ctx.fingerprint("quantize"))] = place(ctx, qmodel)
    return arrays, meta


def run_evaluate(ctx, inputs):
    from mode_jax import evaluation
    from mode_jax.quant import serialize

    c = ctx.config
    fp = model_from_artifact(ctx, inputs["convert"])
    q = inputs["quantize"]
    qmodel = ctx.cache.get(("quantized", ctx.fingerprint("quantize")))
    if qmodel is None:  # a resumed run
        qmodel = place(ctx, serialize.from_artifact(q.arrays, q.meta, source=q.path))
    qmodel = serialize.apply.set_use_kernels(qmodel, c.eval.use_kernels,
                                             c.eval.kernel_dequant)
    metrics, tables, per_sample = evaluation.evaluate(ctx, fp, qmodel)
    metrics["model_bytes"] = int(q.meta["nbytes"]["total"])
    metrics["packed_expert_bytes"] = int(q.meta["nbytes"]["packed"])
    return {"per_sample": per_sample}, {"metrics": metrics, "tables": tables}


# Files are keyed by content (`content_keys`), so a checkpoint rewritten in place reruns every
# stage and one moved elsewhere reruns none; the calibration JSON likewise (its image paths are
# relative to data.image_dir). The image directory stays keyed by its path (hashing a whole image
# store would read far more than a run uses), and so does eval.jsonl (in "eval"; its images are
# relative to it) besides its content.
DATA_FILES = ("data.calib_json",)
STAGES = {
    "convert": Stage("convert", (), ("model.dtype",), run_convert, content_keys=("model.path",)),
    "calibrate": Stage(
        "calibrate", ("convert",),
        ("data.source", "data.image_dir", "data.testbed_stats_tasks",
         "data.num_freq_samples", "data.batch_size", "data.max_length", "data.max_image_tokens",
         "data.lengths_per_doubling", "stats", "model.matmul_precision", "seed"),
        run_calibrate, content_keys=DATA_FILES,
    ),
    "sensitivity": Stage(
        "sensitivity", ("convert",),
        ("data.source", "data.image_dir", "data.testbed_stats_tasks",
         "data.num_sens_samples", "data.batch_size", "data.max_length", "data.max_image_tokens",
         "data.lengths_per_doubling", "stats", "sens", "alloc.bits", "model.matmul_precision",
         "seed"),
        run_sensitivity, content_keys=DATA_FILES,
    ),
    "allocate": Stage("allocate", ("calibrate", "sensitivity"), ("alloc",), run_allocate),
    "quantize": Stage(
        "quantize", ("convert", "allocate"),
        ("quant", "data.source", "data.image_dir", "data.num_gptq_samples",
         "data.batch_size", "data.max_length", "data.max_image_tokens",
         "data.lengths_per_doubling", "model.matmul_precision", "seed"),
        run_quantize, content_keys=DATA_FILES,
        layout=f"packing/{packing.LAYOUT_VERSION}",  # a new bit layout re-packs, not misreads
    ),
    "evaluate": Stage(
        "evaluate", ("convert", "quantize"),
        ("eval", "data.source", "data.image_dir", "data.num_freq_samples",
         "data.num_sens_samples", "data.num_gptq_samples", "data.batch_size", "data.max_length",
         "data.max_image_tokens", "data.lengths_per_doubling", "model.matmul_precision", "seed"),
        run_evaluate, content_keys=(*DATA_FILES, "eval.jsonl"),
    ),
}


# ---------------------------------------------------------------- validation and driver


def validate(config, cache: dict | None = None) -> None:
    """Everything checkable before a stage writes: one clear error, nothing half-written.
    `cache`: the run's shared stage cache, which keeps the ShareGPT records and the tokenizer
    read here for the stages."""
    c = config
    methods = tuple(c.sweep) or (c.alloc.method,)
    for entry in methods:
        m, _, key = entry.partition("/")
        if m not in METHODS or (key and m != "mode"):
            raise UserError(f"unknown method {entry!r}; allowed: {', '.join(METHODS)} "
                            "(and mode/<freq_key> in a sweep)")
        if key and key not in FREQ_KEYS:
            raise UserError(f"unknown frequency key {key!r}; allowed: {', '.join(FREQ_KEYS)}")
    from mode_jax.calib import passes, sources

    for field, allowed in (("alloc.freq_key", FREQ_KEYS),
                           ("model.dtype", tuple(DTYPES)),
                           ("model.matmul_precision", MATMUL_PRECISIONS),
                           ("sens.estimator", passes.ESTIMATORS),
                           ("sens.quantizer", passes.QUANTIZERS),
                           ("sens.trace_curvature", passes.CURVATURES),
                           ("data.source", sources.SOURCES),
                           ("data.testbed_stats_tasks", sources.STATS_TASKS),
                           ("eval.kernel_dequant", ("", *KERNEL_DEQUANT_MODES))):
        section, name = field.split(".")
        if c[section][name] not in allowed:
            shown = ", ".join(a if a else "'' (default)" for a in allowed)
            raise UserError(f"{field}={c[section][name]!r}; allowed: {shown}")
    _validate_settings(c)
    if c.final_stage not in STAGES:
        raise UserError(f"final_stage={c.final_stage!r}; allowed: {', '.join(STAGES)}")
    if not isinstance(c.compilation_cache, str):
        raise UserError(f"compilation_cache={c.compilation_cache!r}: a directory, 'auto' or ''")
    if not c.model.path:
        raise UserError("no model: pass --config.model.path=<checkpoint directory>")
    if not os.path.isdir(c.model.path):
        raise UserError(f"model path {c.model.path!r} is not a directory")
    if not os.path.isfile(os.path.join(c.model.path, "config.json")):
        raise UserError(f"model path {c.model.path!r} has no config.json")
    model_config = _model_config(c)
    _validate_budget(c, methods, model_config)
    _validate_multimodal(c, model_config)
    _validate_files(c, cache)
    if c.final_stage == "evaluate":
        _validate_stop_ids(c, model_config)
    if c.data.source == "sharegpt":
        _validate_records(c, model_config, cache)  # the tokenizer's check included
    else:
        _validate_tokenizer(c, model_config, cache)


def _validate_records(c, model_config, cache: dict | None = None) -> None:
    """The ShareGPT records the stages will draw: something left to evaluate on, readable
    images (headers), the tokenizer, and every prompt within data.max_length."""
    from mode_jax.calib import data, sources

    records = sources.sharegpt_records(c.data, cache)  # names a missing calib_json
    scores_heldout = c.final_stage == "evaluate" and not c.eval.jsonl
    if scores_heldout and not len(sources.heldout_indices(len(records), c.data, c.seed)):
        raise UserError(sources.heldout_error(len(records), c.data))
    take = (c.eval.num_samples or sources.DEFAULT_HELDOUT_CONVERSATIONS) * scores_heldout
    sizes = data.image_sizes(records, c.data.image_dir,
                             sources.drawn_indices(len(records), c.data, c.seed, take))
    _validate_tokenizer(c, model_config, cache)
    sources.check_prompt_lengths(c.data, c.model.path, model_config, c.seed, take, sizes, cache)


def _model_config(c):
    """The family config of the checkpoint's config.json (no weights read)."""
    from mode_jax.convert import families, safetensors_io

    raw = safetensors_io.read_config(c.model.path)
    source = f"{c.model.path}/config.json"
    try:
        return families.for_model_type(raw.get("model_type"), source).config_from_json(
            raw, source)
    except ValueError as e:
        raise UserError(str(e)) from None


def _validate_settings(c) -> None:
    """The numeric settings and the stages' own option checks, before convert runs (they would
    otherwise stop the run at the stage that reads them, after hours of statistics)."""
    from mode_jax.alloc import ilp
    from mode_jax.calib import passes
    from mode_jax.quant import apply
    from pallas_kernels import packing

    for name, least, meaning in (
            ("kl_chunk", 1, "logit_kl variants per folded batch, >= 1"),
            ("trace_batch_size", 0, "random sequences per Hessian-trace batch, >= 1, or 0 for "
             "the calibration batch size"),
            ("trace_layers_per_pass", 0, "MoE layers per Hessian-trace pass, >= 1, or 0 to fit "
             "the device memory")):
        if c.sens[name] < least:
            raise UserError(f"sens.{name}={c.sens[name]}: {meaning}")
    draws = 0 if c.data.source == "sharegpt" else 1  # 0 draws every ShareGPT record
    least = {"seed": 0, "data.batch_size": 1, "data.max_length": 1, "data.max_image_tokens": 0,
             "data.lengths_per_doubling": 0, "data.num_freq_samples": draws,
             "data.num_sens_samples": draws, "data.num_gptq_samples": draws,
             "sens.group_size": 1, "sens.max_tokens": 1, "sens.hutchinson_probes": 1,
             "eval.num_samples": 0,
             "eval.batch_size": 1, "eval.max_new_tokens": 1, "mesh.expert": 1}
    for field, low in least.items():
        value = runner.config_value(c, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            why = f" with data.source={c.data.source!r}" if field.startswith("data.num_") else ""
            raise UserError(f"{field}={value!r}: must be an integer >= {low}{why}")
    if c.eval.max_new_tokens > MAX_NEW_TOKENS:
        raise UserError(f"eval.max_new_tokens={c.eval.max_new_tokens}: at most "
                        f"{MAX_NEW_TOKENS} (the generation cache is allocated for all of them)")
    devices = jax.device_count()
    if devices > 1 and devices % c.mesh.expert:
        raise UserError(f"mesh.expert={c.mesh.expert} does not divide the {devices} devices")
    if devices == 1 and c.mesh.expert > 1:
        log.warning("mesh.expert=%d has no effect on a single device", c.mesh.expert)
    if not math.isfinite(c.alloc.budget_bits):
        raise UserError(f"alloc.budget_bits={c.alloc.budget_bits}: must be a finite number")
    bits = tuple(c.alloc.bits)
    if not bits or len(set(bits)) != len(bits) or not set(bits) <= set(packing.SUPPORTED_BITS):
        raise UserError(f"alloc.bits={bits}: distinct bit-widths from "
                        f"{packing.SUPPORTED_BITS} (what the packed format stores)")
    for field, allowed in (("alloc.solver", ilp.SOLVERS), ("alloc.scope", ilp.SCOPES),
                           ("alloc.mopeq_scope", ilp.SCOPES)):
        if runner.config_value(c, field) not in allowed:
            raise UserError(f"{field}={runner.config_value(c, field)!r}; allowed: "
                            f"{', '.join(allowed)}")
    if not 0.0 <= c.alloc.vision_mix <= 1.0:
        raise UserError(f"alloc.vision_mix={c.alloc.vision_mix}: must lie in [0, 1]")
    checks = (("stats", lambda: passes.StatsConfig(
                   0, key_ratio=c.stats.key_ratio, attention_mode=c.stats.attention_mode,
                   judge_layer=c.stats.judge_layer)),
              ("quant", lambda: apply.QuantConfig.from_config(c.quant)))
    for section, build in checks:
        try:
            build()
        except (ValueError, TypeError) as e:
            raise UserError(f"{section}: {e}") from None


def _validate_files(c, cache: dict | None = None) -> None:
    """The benchmark JSONL (every line and image; kept in `cache` for the evaluate stage) and a
    testbed's recorded task settings, checked before anything runs."""
    from mode_jax.calib import sources
    from mode_jax.testbed import tasks

    try:
        if c.eval.jsonl and c.final_stage == "evaluate":
            sources.benchmark(c.eval.jsonl, cache)
        if c.data.source == "testbed":
            tasks.recorded_config(c.model.path)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None


def _validate_multimodal(c, config) -> None:
    """A text-only checkpoint loads (mode_jax.load) but has no image tokens to calibrate on."""
    from mode_jax.calib import sources
    from mode_jax.convert import families

    if families.image_token_id(config) is None or config.vision is None:
        raise UserError(f"{c.model.path}: {sources.NOT_MULTIMODAL}")
    layers = config.text.num_hidden_layers
    if not config.text.moe_layers:
        raise UserError(f"{c.model.path}: the language model has no MoE layer (of {layers}): "
                        "there are no routed experts to allocate bits to")
    if not -layers <= c.stats.judge_layer < layers:
        raise UserError(f"stats.judge_layer={c.stats.judge_layer}: the model has {layers} "
                        f"decoder layers (use {-layers}..{layers - 1})")


def _validate_tokenizer(c, config, cache: dict | None = None) -> None:
    """The tokenizer that real prompts need loads and its image placeholder is the config's
    image token: found in seconds rather than after converting the weights."""
    if c.data.source == "random" and not c.eval.jsonl:
        return
    from mode_jax import processors
    from mode_jax.calib import data, sources
    from mode_jax.convert import families

    if families.image_token_id(config) is None:
        return  # a text-only checkpoint: _validate_multimodal refused it
    try:
        tokenizer = sources.checkpoint_tokenizer(c.model.path, cache)
        processors.check_image_token(config, tokenizer, f"the tokenizer of {c.model.path}")
        data.template_token_ids(tokenizer, int(families.image_token_id(config)))  # its template
        cap = c.data.max_image_tokens
        processors.image_processor(config, c.model.path, cap)  # Qwen3-VL, InternVL
        processors.kimi_image_config(c.model.path, cap)  # Kimi-VL
    except ValueError as e:
        raise UserError(str(e)) from None
    if c.final_stage == "evaluate" and opens_reasoning(tokenizer):
        log.warning("%s's chat template opens a reasoning block (<think>) in its generation "
                    "prompt: a 'Thinking' checkpoint. Its first %d greedy tokens are reasoning, "
                    "so exact-match accuracy means little; KL and perplexity still compare the "
                    "models", c.model.path, c.eval.max_new_tokens)


def opens_reasoning(tokenizer) -> bool:
    """Whether the chat template's generation prompt starts a `<think>` block (Qwen3-VL's
    Thinking checkpoints), after which a model writes its reasoning, not the answer."""
    from mode_jax import preprocess

    prompt = preprocess.prompt_text([{"role": "user", "content": "hi"}], tokenizer)
    return prompt.rstrip().endswith("<think>")


def _validate_stop_ids(c, model_config) -> None:
    """The end tokens generation stops at (generation_config.json) read and lie in the
    vocabulary: named now rather than when evaluate starts generating."""
    from mode_jax.eval import harness

    ids = harness.generation_stop_ids(c.model.path)  # a malformed file is named
    vocab = int(model_config.text.vocab_size)
    outside = [i for i in ids if i >= vocab]
    if outside:
        raise UserError(f"{c.model.path}/generation_config.json: eos_token_id {outside} lies "
                        f"outside the model's vocabulary of {vocab} tokens")


def _validate_budget(c, methods, model_config) -> None:
    """Solve a zero-cost problem of the real size: the ILP's own checks name what is feasible."""
    from mode_jax.alloc import ilp

    bits = np.asarray(c.alloc.bits)
    if c.alloc.budget_bits != round(c.alloc.budget_bits) and "uniform" in methods:
        raise UserError(f"uniform allocation needs an integer budget, got {c.alloc.budget_bits}")
    if set(methods) <= {"uniform", "mopeq"}:
        return
    text = model_config.text
    n_experts, n_layers = text.n_routed_experts, max(1, len(text.moe_layers))
    scope = "global" if "gemq" in methods else c.alloc.scope
    try:
        ilp.check_problem(np.zeros((n_layers, n_experts, len(bits))), bits, c.alloc.budget_bits,
                          scope, equality=c.alloc.equality, top_levels_required=0)
    except ValueError as e:
        raise UserError(f"infeasible bit budget: {e}") from None


def method_config(config, entry: str):
    """A sweep entry is a method name, or `mode/<freq_key>` for a MODE ablation."""
    method, _, key = entry.partition("/")
    out = copy.deepcopy(config)
    out.unlock()
    out.alloc.method = method
    if key:
        out.alloc.freq_key = key
    out.lock()
    return out


def use_compilation_cache(setting: str, workdir: str) -> str | None:
    """Point jax's persistent compilation cache at `setting` ("auto": `<workdir>/jax_cache`;
    "": off) unless JAX_COMPILATION_CACHE_DIR is set; returns the directory in use. Programs
    that compile in under a second are cached too: on the tiny config a rerun then compiles
    in 15 s instead of 48 s."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not setting:
        return None
    path = os.path.join(workdir, "jax_cache") if setting == "auto" else setting
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"compilation_cache={path!r} cannot be used as a directory: "
                        f"{e.strerror or e}") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


REPORTED_STAGES = ("allocate", "quantize", "evaluate")  # a run that ends here writes a report


def run(config, workdir: str) -> str:
    """Run every stage up to `config.final_stage` for each method; returns the report path, or
    for a run that ends before allocation, the final artifact's path (the first method's).

    A multi-process job calls `multihost.initialize()` first; each process then calls this."""
    final_stage = config.final_stage
    runner.check_workdir(workdir)
    shared: dict = {}  # the fp model, its evaluation, records, tokenizer: shared by the methods
    validate(config, shared)
    order = list(STAGES)
    upto = order[:order.index(final_stage) + 1]  # pipeline order: every stage up to the final
    use_compilation_cache(config.compilation_cache, workdir)
    methods = tuple(config.sweep) or (config.alloc.method,)
    contexts = []
    with jax.default_matmul_precision(config.model.matmul_precision):
        for method in methods:
            ctx = runner.Context(method_config(config, method), workdir, STAGES)
            ctx.cache = shared  # one model in memory for every method
            for name in upto:
                path = ctx.ensure(name).path
            log.info("method %s: %s", method, path)
            contexts.append(ctx)
    if final_stage not in REPORTED_STAGES:
        return contexts[0].ensure(final_stage).path
    from mode_jax import multihost, report

    if multihost.is_primary():
        report.write(workdir, config, contexts)
    multihost.barrier("report written")
    return report.markdown_path(workdir)
