"""Text-only training probe: what makes the testbed's routed experts fragile under quantization?

    python -m mode_jax.testbed.text_probe --arithmetic_max 19 --steps 2200 --expert_width 32

Trains the testbed's language model (no images: the text family only, the testbed recipe's
optimiser, balancing and capacity dispatch) with a chosen knowledge load (`--names`,
`--arithmetic_max`) and expert layout (`--expert_width`, `--shared_experts`, `--experts`,
`--top_k`), then prints the held-out accuracy per task of the trained model, of the model with
its routed or its shared experts switched off, and of uniform round-to-nearest at 2, 3 and 4
bits on the routed experts.
A few minutes per run on 2 CPU cores: the quick way to try a recipe before the 35-minute
multimodal retrain (`train.py`), which shares every function used here.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Sequence

from flax import nnx

import mode_jax
from mode_jax.convert import export
from mode_jax.eval import harness
from mode_jax.models.kimivl import KimiVL
from mode_jax.preprocess import ImageConfig
from mode_jax.quant import fake
from mode_jax.testbed import card, tasks, train
from mode_jax.testbed import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    names: int = 8
    arithmetic_max: int = 9
    expert_width: int = 128
    shared_experts: int = 1
    experts: int = 16
    top_k: int = 2
    steps: int = 600
    batch: int = 48
    lr: float = 2e-3
    eval_samples: int = 500
    seed: int = 0
    label_smoothing: float = 0.0  # on the answer tokens (train.answer_loss)
    shared_dropout: float = 0.0  # rows trained without the shared experts (train.TrainConfig)
    # language-model depth (the first layer stays dense) and AdamW decay: the testbed's own
    layers: int = train.model_config().text.num_hidden_layers
    weight_decay: float = train.TrainConfig.weight_decay


@nnx.jit(static_argnames=("gamma", "label_smoothing"))
def _step(model, optimizer, rows, gamma: float, label_smoothing: float = 0.0):
    def loss_fn(m):
        total, counts, _, answer = train.answer_loss(m, rows, None, context_weight=0.5,
                                                     label_smoothing=label_smoothing)
        return total, (answer, counts)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, train.trainable(True)),
                                 has_aux=True)
    (_, (answer, counts)), grads = grad_fn(model)
    optimizer.update(model, grads)
    train.balance_experts(model, counts, gamma)
    return answer


def run(cfg: ProbeConfig, log=print) -> dict[str, dict]:
    """Train, then score the variants; returns {variant: harness result}."""
    task_cfg = tasks.TaskConfig(tasks=tasks.TEXT_TASKS, names=cfg.names,
                                arithmetic_max=cfg.arithmetic_max)
    tokenizer = tok_lib.build_tokenizer(tasks.vocabulary(task_cfg))
    config = train.model_config(vocab_size=train.vocab_size_for(tokenizer),
                                image_token_id=tok_lib.image_token_id(tokenizer))
    config = dataclasses.replace(config, text=dataclasses.replace(
        config.text, moe_intermediate_size=cfg.expert_width, n_shared_experts=cfg.shared_experts,
        n_routed_experts=cfg.experts, num_experts_per_tok=cfg.top_k,
        num_hidden_layers=cfg.layers))
    model = KimiVL(config, rngs=nnx.Rngs(cfg.seed))
    train.zero_mlp_down(model)
    train.use_capacity_dispatch(model, 2.0)
    dropped = train.use_shared_dropout(model, cfg.shared_dropout, cfg.seed)
    optimizer = train.make_optimizer(model, cfg.lr, min(100, cfg.steps // 10), cfg.steps,
                                     clip_norm=1.0, weight_decay=cfg.weight_decay,
                                     freeze_vision=True)
    image_cfg, length, start = ImageConfig(), 40, time.time()
    for step in range(1, cfg.steps + 1):
        samples = tasks.generate("train", cfg.batch, cfg.seed * 10_000_000 + step, task_cfg)
        rows = train.encode_rows(samples, tokenizer, image_cfg, length)
        length = rows["input_ids"].shape[1]
        loss = _step(model, optimizer, train.split_static(rows)[0], 1e-2, cfg.label_smoothing)
        if step % 200 == 0 or step == cfg.steps:
            log(f"step {step}  answer loss {float(loss):.4f}  {time.time() - start:.0f}s")
    train.restore_shared(dropped)
    with tempfile.TemporaryDirectory() as tmp:  # reload as users do (exact experts path)
        export.save(model, tmp, tokenizer=tokenizer, image_config=image_cfg)
        model = mode_jax.load(tmp)
    data = harness.encode(tasks.generate("heldout", cfg.eval_samples, cfg.seed, task_cfg),
                          tokenizer, image_cfg)
    full = harness.evaluate(model, data, routing=True)  # expert counts, for the record
    results = {"full precision": full}
    for part in ("routed", "shared"):
        if part == "routed" or cfg.shared_experts:
            results[f"{part} off"] = harness.evaluate(card.without(model, part), data,
                                                      reference=full, keep_logprobs=False)
    for bits in (2, 3, 4):
        quantized = fake.fake_quantize(model, fake.uniform_bits(model, bits), 128)
        results[f"RTN {bits}-bit"] = harness.evaluate(quantized, data, reference=full,
                                                      keep_logprobs=False)
    return results


def table(results: dict[str, dict]) -> str:
    """Accuracy (%) per task and for the family, KL to full precision."""
    names = sorted(results["full precision"]["accuracy"]["task"])
    lines = ["| variant | " + " | ".join(names) + " | text | KL |",
             "| --- " * (len(names) + 3) + "|"]
    for variant, res in results.items():
        acc = res["accuracy"]
        cells = [f"{100 * acc['task'][t]:.1f}" for t in names]
        kl = f"{res['kl']['all']:.4f}" if "kl" in res else "0"
        lines.append(f"| {variant} | " + " | ".join(cells)
                     + f" | {100 * acc['family']['text']:.1f} | {kl} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(ProbeConfig):
        p.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    cfg = ProbeConfig(**vars(p.parse_args(argv)))
    print(cfg, flush=True)
    print(table(run(cfg, log=lambda msg: print(msg, flush=True))))


if __name__ == "__main__":
    main()
