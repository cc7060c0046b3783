"""Training-only pieces of the testbed: the capacity dispatch against the model's dense experts,
the vision warm-up labels against the scene geometry, the training batches' masks."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import ndimage

from mode_jax.models import moe
from mode_jax.models.deepseek_v3 import MLP
from mode_jax.preprocess import ImageConfig
from mode_jax.testbed import card, tasks, train, vision_warmup
from mode_jax.testbed import tokenizer as tok_lib


def _routing(seed, n=24, e=8, k=2, d=16, f=8):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (n, d))
    logits = jax.random.normal(keys[1], (n, e))
    ids, weights = moe.route(logits, moe.RouterConfig(num_experts=e, top_k=k))
    gate_up = jax.random.normal(keys[2], (e, d, 2 * f)) * 0.3
    down = jax.random.normal(keys[3], (e, f, d)) * 0.3
    return x, ids, weights, gate_up, down


def test_capacity_dispatch_equals_dense_experts_when_nothing_is_dropped():
    x, ids, weights, gate_up, down = _routing(0)
    want = moe.experts_dense(x, ids, weights, gate_up, down)
    got = train.capacity_experts(x, ids, weights, gate_up, down, capacity=x.shape[0] * 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_capacity_dispatch_drops_the_latest_tokens_of_a_full_expert():
    x, ids, weights, gate_up, down = _routing(1)
    cap = 2
    got = np.asarray(train.capacity_experts(x, ids, weights, gate_up, down, capacity=cap))
    # brute force: walk tokens in order, an expert serves its first `cap` (token, slot) pairs
    served = np.zeros(gate_up.shape[0], int)
    want = np.zeros_like(got)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if served[e] < cap:
                served[e] += 1
                y = moe.swiglu(x[t:t + 1], gate_up[e], down[e])[0]
                want[t] += float(weights[t, slot]) * np.asarray(y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_capacity_experts_module_shares_the_model_parameters():
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(0))
    before = model.language_model.layers[1].mlp.experts.gate_up
    train.use_capacity_dispatch(model, 2.0)
    swapped = model.language_model.layers[1].mlp.experts
    assert isinstance(swapped, train.CapacityExperts) and swapped.gate_up is before
    assert isinstance(model.language_model.layers[0].mlp, MLP)  # the dense layer is left alone


def test_shared_dropout_skips_whole_rows_draws_anew_each_step_and_restores():
    """Training rows skip the shared experts with probability `rate` (kept ones scaled by
    1 / (1 - rate)), a fresh draw per jitted call; restoring gives back the same trained MLPs."""
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(0))
    shared = model.language_model.layers[1].mlp.shared_experts
    x = jax.random.normal(jax.random.key(1), (64, 3, model.config.text.hidden_size))
    full = np.asarray(shared(x))
    originals = train.use_shared_dropout(model, 0.25, seed=0)
    assert len(originals) == model.config.text.num_hidden_layers - 1  # every MoE layer
    dropped = model.language_model.layers[1].mlp.shared_experts
    assert isinstance(dropped, train.DroppedShared) and dropped.down_proj is shared.down_proj

    @nnx.jit
    def call(module, x):
        return module(x)

    draws = []
    for _ in range(2):
        y = np.asarray(call(dropped, x))
        kept = np.array([np.allclose(y[b], full[b] / 0.75, rtol=1e-5, atol=1e-6)
                         for b in range(64)])
        zero = ~y.reshape(64, -1).any(axis=1)
        assert np.all(kept ^ zero)  # each row is either skipped or scaled, never mixed
        assert 6 <= zero.sum() <= 28  # about a quarter of 64 rows
        draws.append(zero)
    assert not np.array_equal(*draws)  # the rng advances between jitted calls
    train.shared_dropout_on(model, False)  # what the held-out probes score
    np.testing.assert_array_equal(np.asarray(call(dropped, x)), full)
    train.shared_dropout_on(model, True)
    assert not np.array_equal(np.asarray(call(dropped, x)), full)
    train.restore_shared(originals)
    assert model.language_model.layers[1].mlp.shared_experts is shared
    np.testing.assert_array_equal(np.asarray(shared(x)), full)
    assert train.use_shared_dropout(model, 0.0, seed=0) == []  # rate 0 leaves the model alone
    with pytest.raises(ValueError, match="shared_dropout=1.0"):
        train.TrainConfig(shared_dropout=1.0)


def test_routed_experts_start_at_the_dense_mlps_scale():
    """Each expert's matrices start at LeCun normal per expert (std 1/sqrt(fan_in)), the init of
    the shared expert's and the dense layer's nnx.Linear: at a smaller scale training would put
    the skills in those instead."""
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(0))
    mlp = model.language_model.layers[1].mlp
    for w in (mlp.experts.gate_up[...], mlp.experts.down[...]):
        fan_in = w.shape[1]
        per_expert = np.asarray(w).reshape(w.shape[0], -1).std(axis=1)
        np.testing.assert_allclose(per_expert, 1 / np.sqrt(fan_in), rtol=0.1)
    shared = np.asarray(mlp.shared_experts.down_proj.kernel[...])
    np.testing.assert_allclose(shared.std(), 1 / np.sqrt(shared.shape[0]), rtol=0.1)
    gu = np.asarray(mlp.experts.gate_up[...])
    assert not np.allclose(gu[0], gu[1])  # experts are drawn independently


def test_zero_mlp_down_zeroes_every_language_mlp_output_and_nothing_else():
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    train.zero_mlp_down(model)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    changed = []
    for path, value in jax.tree_util.tree_leaves_with_path(after):
        old = before
        for key in path:
            old = old[key.key]
        if not np.array_equal(np.asarray(value), old):
            assert not np.any(np.asarray(value))
            changed.append(jax.tree_util.keystr(path))
    layers = model.config.text.num_hidden_layers
    assert len(changed) == 1 + 2 * (layers - 1), changed  # dense down; per MoE: shared, routed
    assert all("language_model" in c and "down" in c for c in changed), changed


def test_warmup_labels_follow_the_scene_geometry():
    square = tasks.Shape("square", "blue", cx=98, cy=70, r=30)  # spans x 73..123, y 45..95
    cross = tasks.Shape("cross", "red", cx=250, cy=250, r=34)
    image, shapes, colors, centres, relations = vision_warmup.cell_labels(
        [square, cross], (336, 336), 5)
    assert image.shape == (336, 336, 3)
    def grid(a):
        return a.reshape(12, 12)

    sq, bl = tasks.SHAPES.index("square") + 1, list(tasks.COLORS).index("blue") + 1
    assert grid(shapes)[2, 3] == sq and grid(colors)[2, 3] == bl  # cell y 56..83, x 84..111
    assert grid(shapes)[0, 0] == grid(colors)[11, 0] == vision_warmup.BACKGROUND
    assert grid(shapes)[8, 8] == tasks.SHAPES.index("cross") + 1  # the cross's centre cell
    np.testing.assert_array_equal(np.flatnonzero(centres), [2 * 12 + 3, 8 * 12 + 8])
    # every labelled cell is mostly covered by its object's bounding box
    for cell in np.flatnonzero(shapes):
        y, x = divmod(int(cell), 12)
        o = square if shapes[cell] == sq else cross
        assert o.cx - o.r - 28 < x * 28 + 14 < o.cx + o.r + 28
        assert o.cy - o.r - 28 < y * 28 + 14 < o.cy + o.r + 28
    # two objects: each one's cells carry where it lies relative to the other (dx = dy here:
    # no clear axis, so no label); a clear pair labels both, each from its own side
    assert not relations.any()
    left = tasks.Shape("circle", "green", cx=60, cy=170, r=30)
    _, shapes, _, _, relations = vision_warmup.cell_labels([left, cross], (336, 336), 5)
    is_left = shapes == tasks.SHAPES.index("circle") + 1
    is_cross = shapes == tasks.SHAPES.index("cross") + 1
    assert is_left.any() and is_cross.any()
    assert set(relations[is_left]) == {tasks.RELATIONS.index("left") + 1}
    assert set(relations[is_cross]) == {tasks.RELATIONS.index("right") + 1}
    assert not relations[shapes == vision_warmup.BACKGROUND].any()
    # one or three objects: no relation labels
    assert not vision_warmup.cell_labels([left], (336, 336), 5)[4].any()


def test_warmup_relation_share_draws_two_object_scenes():
    rng = np.random.default_rng(1)
    cfg = tasks.TaskConfig()
    scenes = [vision_warmup.random_scene(rng, cfg, relation_share=1.0) for _ in range(20)]
    assert {len(s) for s in scenes} == {2}
    _, _, labels = vision_warmup.batch(rng, 4, cfg, ImageConfig(), grid=12, relation_share=1.0)
    assert labels.shape[0] == 6 and (labels[5] > 0).any()


def test_training_rows_mark_answers_and_images():
    tok = tok_lib.build_tokenizer(tasks.vocabulary())
    samples = tasks.generate("train", 3, 0, tasks.TaskConfig(tasks=("color", "fact")))
    rows = train.encode_rows(samples, tok, ImageConfig(), length=8)
    assert rows["input_ids"].shape[1] % 8 == 0
    assert rows["grid_hws"] == ((24, 24),) * sum(s.image is not None for s in samples)
    for b, s in enumerate(samples):
        answer = rows["input_ids"][b][rows["target_mask"][b]]
        assert tok.decode(answer[:-1]) == s.answer
        assert answer[-1] == tok.convert_tokens_to_ids(tok_lib.IM_END)
        n_img = int(np.sum(rows["input_ids"][b] == tok_lib.image_token_id(tok)))
        assert n_img == (144 if s.image is not None else 0)
    assert jnp.asarray(rows["attention_mask"]).sum() == sum(
        len(tok_lib.encode_example(tok, s.prompt, s.answer,
                                   [(24, 24)] if s.image is not None else None)[0])
        for s in samples)


def test_label_smoothing_spreads_the_answer_target_over_the_vocabulary():
    tok = tok_lib.build_tokenizer(tasks.vocabulary())
    samples = tasks.generate("train", 4, 1, tasks.TaskConfig(tasks=("fact", "arithmetic")))
    rows, _ = train.split_static(train.encode_rows(samples, tok, ImageConfig(), length=8))
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(2))
    logits = model.forward(rows["input_ids"], rows["attention_mask"], None, None).logits
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1), np.float64)
    targets = np.asarray(rows["input_ids"])[:, 1:]
    answer = np.asarray(rows["target_mask"])[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0][answer]
    uniform = -logp.mean(-1)[answer]  # cross-entropy against the uniform distribution
    for eps in (0.0, 0.2):
        fit, _, _, plain = train.answer_loss(model, rows, None, label_smoothing=eps)
        np.testing.assert_allclose(float(plain), nll.mean(), rtol=1e-5)  # reported: plain CE
        np.testing.assert_allclose(float(fit), ((1 - eps) * nll + eps * uniform).mean(),
                                   rtol=1e-5)


def test_embedding_rows_cover_the_tokenizer_of_a_larger_task_suite():
    """The default suite fits the shipped 256 rows; operands up to 29 add 40 number words and
    must grow the embedding (to the next multiple of 64), not overflow it."""
    default = tok_lib.build_tokenizer(tasks.vocabulary())
    larger = tok_lib.build_tokenizer(tasks.vocabulary(tasks.TaskConfig(arithmetic_max=29)))
    assert len(default) <= 256 == train.vocab_size_for(default)
    assert len(larger) == len(default) + 40
    assert train.vocab_size_for(larger) == 320 >= len(larger)


def test_warmup_positions_share_one_scale_across_image_sizes():
    """Cell i of n gets label (2i + 1) * 12 // 2n: a small image's cells land on the labels of
    the big image's cells at the same relative place."""
    rng = np.random.default_rng(0)
    small = tasks.TaskConfig(image_size=(168, 168))
    _, grids, labels = vision_warmup.batch(rng, 2, small, ImageConfig(), grid=12)
    assert grids == ((12, 12), (12, 12))  # patches; 6 x 6 merged tokens each
    rows, cols = labels[3].reshape(2, 6, 6), labels[4].reshape(2, 6, 6)
    np.testing.assert_array_equal(rows[0, :, 0], [1, 3, 5, 7, 9, 11])
    np.testing.assert_array_equal(cols[1, 0, :], [1, 3, 5, 7, 9, 11])
    _, _, big = vision_warmup.batch(rng, 1, tasks.TaskConfig(), ImageConfig(), grid=12)
    np.testing.assert_array_equal(big[3].reshape(12, 12)[:, 0], np.arange(12))


def test_curriculum_switches_scene_size_after_small_image_steps():
    cfg = train.TrainConfig(small_image_steps=1, batch_vision_small=2, batch_vision=1,
                            batch_text_small=3, batch_text=1)
    data = train.Batches(cfg, train.build_tokenizer(), ImageConfig())
    first, first_text = data.step(1)
    second, second_text = data.step(2)
    assert first["grid_hws"] == ((12, 12),) * 2 and second["grid_hws"] == ((24, 24),)
    assert len(first_text["input_ids"]) == 3 and len(second_text["input_ids"]) == 1


def test_the_position_form_flag_reaches_tokenizer_and_batches():
    """The 'subject' (default) and 'shape' forms need their extra word ("other") in the
    tokenizer, and their position questions in both scene sizes; 'relation' does without it."""
    assert len(train.build_tokenizer(train.TrainConfig(position_form="relation"))) == 240
    assert "other" in train.build_tokenizer().get_vocab()  # the shipped (subject) form
    for form in ("subject", "shape"):
        cfg = train.TrainConfig(position_form=form, small_image_steps=1, batch_vision_small=8,
                                batch_vision=8, batch_text=1, vision_mix=("position", "color"),
                                vision_mix_small=("position", "color"))
        tokenizer = train.build_tokenizer(cfg)
        assert "other" in tokenizer.get_vocab() and len(tokenizer) == 241
        data = train.Batches(cfg, tokenizer, ImageConfig())
        other = tokenizer.convert_tokens_to_ids("other")
        for step in (1, 2):  # small scenes, then full-size ones
            vision, _ = data.step(step)
            assert (vision["input_ids"] == other).sum() == 4


def test_the_vision_mix_flags_set_each_phase():
    cfg = train.TrainConfig(small_image_steps=1, batch_vision_small=6, batch_vision=6,
                            batch_text=1, vision_mix_small=("color",),
                            vision_mix=("position", "position", "count"))
    data = train.Batches(cfg, train.build_tokenizer(cfg), ImageConfig())
    small = data.family("vision_small", "train", 6, 0)[1]
    full = data.family("vision", "train", 6, 0)[1]
    assert small == ["color"] * 6 and sorted(full) == ["count"] * 2 + ["position"] * 4
    with pytest.raises(ValueError, match="unknown \\['colour'\\]"):
        train.TrainConfig(vision_mix=("colour",))
    with pytest.raises(ValueError, match="vision_mix_small=\\(\\)"):
        train.TrainConfig(vision_mix_small=())


def test_train_min_objects_shapes_full_size_training_scenes_only():
    """Full-size training look-up scenes get at least train_min_objects objects; the small-scene
    phase and the held-out probes are drawn like the held-out split (one-object scenes
    included)."""
    cfg = train.TrainConfig(train_min_objects=3, vision_mix=("shape",),
                            vision_mix_small=("color",))
    data = train.Batches(cfg, None, ImageConfig())
    samples = tasks.generate("train", 8, 0, data.configs["vision"])
    assert [_objects(s.image) for s in samples] == [3] * 8
    small = tasks.generate("train", 40, 0, data.configs["vision_small"])
    assert {_objects(s.image) for s in small} == {1, 2, 3}
    for name in ("vision", "vision_small"):
        assert data.probe_configs[name].min_objects == 1
    assert data.configs["vision_small"] == cfg.small_task_config(("color",))
    probes = tasks.generate("heldout", 40, 0, data.probe_configs["vision"])
    assert {_objects(s.image) for s in probes} == {1, 2, 3}
    one = train.TrainConfig(train_min_objects=1)  # 1 trains on the held-out suite's scenes
    assert one.training_configs()["vision"] == one.task_config(train.VISION_MIX)
    assert train.TrainConfig().training_configs()["vision"].min_objects == 3  # the shipped recipe
    with pytest.raises(ValueError, match="train_min_objects=4"):
        train.TrainConfig(train_min_objects=4)


def _objects(image) -> int:
    """Saturated blobs on the pale background (objects never touch: one per 28-pixel cell)."""
    img = image.astype(int)
    return ndimage.label(img.max(-1) - img.min(-1) > 60)[1]


@pytest.mark.slow
def test_the_training_script_reproduces_its_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    """Retraining with the same seed gives the same weights, and the card gives the same figures
    for them, the two properties that make the shipped testbed reproducible (here on a few tiny
    steps). The second training skips its card: equal bytes in, the card's own rerun below shows
    the same figures out."""
    cfg = train.TrainConfig(steps=3, small_image_steps=2, batch_vision=2, batch_vision_small=2,
                            batch_text=2, vision_warmup_steps=2, vision_warmup_batch=2,
                            probe_samples=2, eval_samples=4, log_every=1, warmup=1,
                            portable_math=False)  # this process's JAX already runs
    first = train.train(cfg, tmp_path / "a", log=lambda _: None)
    with monkeypatch.context() as m:
        m.setattr(train.card, "write", lambda *_, **__: {})
        second = train.train(cfg, tmp_path / "b", log=lambda _: None)
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b
    assert first["history"] == [{**h, "seconds": h0["seconds"]}
                                for h, h0 in zip(second["history"], first["history"],
                                                 strict=True)]
    # Rerunning the card alone gives the same figures and refreshes train_summary.json too.
    path = tmp_path / "a" / "train_summary.json"
    stale = json.loads(path.read_text())
    assert [r["bits"] for r in stale["rtn"]] == [1, 2, 3, 4]
    path.write_text(json.dumps({**stale, "rtn": stale["rtn"][1:], "removed": []}))
    card.write(tmp_path / "a", cfg.eval_samples, log=lambda _: None)
    fresh = json.loads(path.read_text())

    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    for key in ("rtn", "rtn_trained", "removed"):
        assert untimed(fresh[key]) == untimed(stale[key]), key
    assert [r["removed"] for r in fresh["removed"]] == list(card.PARTS)
    assert fresh["divergence"] == stale["divergence"]
    assert {k: v for k, v in fresh["heldout"].items() if k != "wall_seconds"} == {
        k: v for k, v in stale["heldout"].items() if k != "wall_seconds"}
    assert fresh["history"] == stale["history"]  # the training record is kept


def test_a_warmup_as_long_as_the_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="warmup=100 must be .* below steps=50"):
        train.train(train.TrainConfig(steps=50), tmp_path)
    assert not any(tmp_path.iterdir())


def test_command_line_flags_reach_the_train_config(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(train, "train", lambda cfg, out, log: seen.append(cfg))
    train.main(["--out", str(tmp_path), "--attention_heads", "8", "--head_dim", "16",
                "--position_form", "shape", "--vision_mix", "color", "shape"])
    (cfg,) = seen
    assert (cfg.attention_heads, cfg.head_dim, cfg.position_form, cfg.vision_mix) == (
        8, 16, "shape", ("color", "shape"))
    assert cfg.vision_mix_small == train.VISION_MIX
    text = train.model_config(attention_heads=8, head_dim=16).text
    assert (text.num_attention_heads, text.qk_nope_head_dim, text.v_head_dim) == (8, 16, 16)
    with pytest.raises(SystemExit) as bad:
        train.main(["--out", str(tmp_path), "--vision_mix", "colour"])
    assert bad.value.code == 2


def test_command_line_round_trips_through_the_parser(monkeypatch):
    """The card's training command, run, rebuilds the recorded config (defaults left out)."""
    cfg = train.TrainConfig(steps=1900, small_image_size=(112, 112), freeze_vision=False,
                            lr=1e-3, attention_heads=8, vision_mix=("color", "shape"))
    line = train.command_line(cfg)
    assert line.startswith("python -m mode_jax.testbed.train --out checkpoints/testbed --")
    assert "--seed" not in line and "--freeze_vision false" in line
    assert train.command_line(train.TrainConfig()) == card.TRAIN_COMMAND
    seen = []
    monkeypatch.setattr(train, "train", lambda c, out, log: seen.append((c, out)))
    train.main(line.split()[3:])
    assert seen == [(cfg, "checkpoints/testbed")]
    recorded = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as train_summary.json holds it
    assert card.train_command(recorded) == line
    del recorded["attention_heads"]  # a summary written before that flag existed
    assert "older recipe" in card.train_command(recorded)


def test_rows_mark_the_answer_query_and_the_named_objects_image_token():
    tok = tok_lib.build_tokenizer(tasks.vocabulary())
    samples = tasks.generate("train", 12, 5, tasks.TaskConfig(tasks=("shape", "count", "fact")))
    rows = train.encode_rows(samples, tok, ImageConfig(), length=8)
    image = rows["input_ids"] == tok_lib.image_token_id(tok)
    for b, s in enumerate(samples):
        first_answer = int(np.flatnonzero(rows["target_mask"][b])[0])
        assert np.flatnonzero(rows["query_mask"][b]).tolist() == [first_answer - 1]
        marked = np.flatnonzero(rows["lookup_mask"][b])
        assert image[b, marked].all() and len(marked) == len(s.target_cells)
        # the k-th image token of the row is cell k of the image
        assert (np.flatnonzero(image[b])[list(s.target_cells)] == marked).all()
        assert (len(marked) > 0) == (s.task == "shape")


def test_lookup_loss_asks_one_heads_worth_of_attention_and_skips_rows_naming_nothing():
    mask = np.zeros((3, 6), bool)
    mask[0, 2] = mask[1, [1, 3]] = True  # row 2 names no object
    scores = np.full((3, 6), 0.05, np.float32)
    scores[0, 2] = 0.3   # 4 heads x 0.3 >= 1: found
    scores[1, [1, 3]] = 0.05  # 4 x 0.1 = 0.4
    scores[2] = 0.0      # would be -log(1e-6) if it counted
    got = float(train.lookup_loss(jnp.asarray(scores), jnp.asarray(mask), heads=4))
    np.testing.assert_allclose(got, (0.0 - np.log(0.4)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="lookup_layer=0"):
        train.TrainConfig(lookup_layer=0)
    with pytest.raises(ValueError, match="lookup_weight=-1"):
        train.TrainConfig(lookup_weight=-1.0)


def test_the_lookup_aid_moves_attention_onto_the_named_object():
    """The aid adds weight x lookup_loss of the chosen layer, and a few steps on it alone raise
    that layer's attention on the named object's token."""
    tok = tok_lib.build_tokenizer(tasks.vocabulary())
    suite = tasks.TaskConfig(tasks=("shape",), image_size=(112, 112), object_size=(7, 10))
    samples = tasks.generate("train", 4, 2, suite)
    rows, grid = train.split_static(train.encode_rows(samples, tok, ImageConfig(), length=8))
    model = train.KimiVL(train.model_config(), rngs=nnx.Rngs(0))

    def mass():
        out = model.forward(rows["input_ids"], rows["attention_mask"], rows["pixel_values"], grid,
                            image_query_mask=rows["query_mask"])
        return float(np.mean(np.sum(np.where(rows["lookup_mask"], out.image_scores[2], 0), -1)))

    plain = train.answer_loss(model, rows, grid)[0]
    aided = train.answer_loss(model, rows, grid, lookup_weight=0.5, lookup_layer=2)[0]
    scores = model.forward(rows["input_ids"], rows["attention_mask"], rows["pixel_values"], grid,
                           image_query_mask=rows["query_mask"]).image_scores[2]
    np.testing.assert_allclose(float(aided), float(plain) + 0.5 * float(
        train.lookup_loss(scores, rows["lookup_mask"], 4)), rtol=1e-5)
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    step = nnx.jit(lambda m, o: o.update(m, nnx.grad(lambda m: train.lookup_loss(
        m.forward(rows["input_ids"], rows["attention_mask"], rows["pixel_values"], grid,
                  image_query_mask=rows["query_mask"]).image_scores[2],
        rows["lookup_mask"], 4))(m)))
    before = mass()
    for _ in range(15):
        step(model, optimizer)
    assert mass() > 2 * before


def test_a_target_cell_past_the_image_tokens_is_named():
    tok = tok_lib.build_tokenizer(tasks.vocabulary())
    sample = tasks.generate("train", 1, 0, tasks.TaskConfig(tasks=("shape",)))[0]
    broken = dataclasses.replace(sample, target_cells=(144,))  # a 12 x 12 grid has 0..143
    with pytest.raises(ValueError, match="cell 144 is past the 144 image tokens"):
        train.encode_rows([broken], tok, ImageConfig(), length=8)
