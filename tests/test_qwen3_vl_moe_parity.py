"""The whole Qwen3-VL-MoE model against transformers' `Qwen3VLMoeForConditionalGeneration`.

A tiny random model (vision tower with DeepStack, MoE text model with M-RoPE) built offline in
float32 with eager attention; batches with images of different grids, text-only rows and
padding. Measure: max |jax - torch| / max |torch| over real tokens <= 1e-4. The same model
saved with `save_pretrained` converts through `from_directory` (the published file layout)
to the same logits.
"""

import json

import numpy as np
import pytest
import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from mode_jax.convert import mapping
from mode_jax.convert import qwen3_vl_moe as convert
from mode_jax.eval import generate
from mode_jax.models import qwen3_vl_moe as qvl

REL_TOL = 1e-4
IMAGE, START, END = 70, 72, 73
TEXT = dict(vocab_size=80, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=2,
              temporal_patch_size=2, in_channels=3, spatial_merge_size=2, out_hidden_size=32,
              num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
PATCH_DIM = 3 * 2 * 2 * 2


@pytest.fixture(scope="module")
def hf():
    return hf_model()


def hf_model():
    """The tiny random transformers model (norm weights moved off 1), float32, eager."""
    torch.manual_seed(0)
    cfg = Qwen3VLMoeConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE,
                           video_token_id=71, vision_start_token_id=START,
                           vision_end_token_id=END, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen3VLMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_batch(grids, rows, t, left_pad=0, seed=0):
    """rows: per row, the image indices it shows (each as START, tokens, END) after 2 text
    tokens; text fills the rest; `left_pad` pads row 0 on the left."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 60, (len(rows), t))
    mask = np.ones_like(ids)
    for r, images in enumerate(rows):
        pos = 2 + (left_pad if r == 0 else 0)
        for i in images:
            n = grids[i][0] * grids[i][1] * grids[i][2] // 4
            ids[r, pos] = START
            ids[r, pos + 1 : pos + 1 + n] = IMAGE
            ids[r, pos + 1 + n] = END
            pos += n + 3
    if left_pad:
        ids[0, :left_pad], mask[0, :left_pad] = 0, 0
    n_patches = sum(a * b * c for a, b, c in grids)
    pixels = rng.standard_normal((n_patches, PATCH_DIM)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                image_grid_thw=np.asarray(grids), mm_token_type_ids=(ids == IMAGE).astype(int))


def torch_logits(model, batch):
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in batch.items()})
    return out.logits.numpy()


def rel_err(ours, ref, mask):
    real = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[real] - ref[real]).max() / np.abs(ref[real]).max())


BATCHES = {
    "two_images_one_row_each": (((1, 4, 6), (1, 6, 4)), [[0], [1]], 20, 0),
    "two_images_in_one_row_and_left_pad": (((1, 4, 4), (1, 4, 8)), [[0, 1], []], 24, 3),
}


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_logits_match_transformers(hf, name):
    grids, rows, t, left_pad = BATCHES[name]
    batch = make_batch(grids, rows, t, left_pad)
    ours = convert.from_torch(hf)
    out = ours(batch)
    assert rel_err(out.logits, torch_logits(hf, batch), batch["attention_mask"]) <= REL_TOL


def test_positions_follow_image_grids(hf):
    config = qvl.Qwen3VLMoeConfig.from_dict(hf.config.to_dict())
    batch = make_batch(((1, 4, 6), (1, 6, 4)), [[0], [1]], 20)
    args = qvl.prepare_batch(config, batch)
    pos = np.asarray(args["positions"])
    # row 0: 2 text, START at 2, a 2 x 3 merged image from position 3, END at 3 + max(2, 3)
    np.testing.assert_array_equal(pos[:, 0, :3], [[0, 1, 2]] * 3)
    np.testing.assert_array_equal(pos[0, 0, 3:9], [3] * 6)
    np.testing.assert_array_equal(pos[1, 0, 3:9], [3, 3, 3, 4, 4, 4])
    np.testing.assert_array_equal(pos[2, 0, 3:9], [3, 4, 5, 3, 4, 5])
    np.testing.assert_array_equal(pos[:, 0, 9], [6, 6, 6])
    # HF's own index, row by row
    with torch.no_grad():
        ref, deltas = hf.model.get_rope_index(
            torch.tensor(batch["input_ids"]), torch.tensor(batch["mm_token_type_ids"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
            attention_mask=torch.tensor(batch["attention_mask"]))
    np.testing.assert_array_equal(pos, ref.numpy())
    np.testing.assert_array_equal(args["rope_delta"], deltas.numpy()[:, 0])


def test_text_only_rows_match_transformers(hf):
    rng = np.random.default_rng(5)
    batch = {"input_ids": rng.integers(1, 60, (2, 9)),
             "attention_mask": np.ones((2, 9), np.int64)}
    ours = convert.from_torch(hf)
    ref = torch_logits(hf, batch)
    assert rel_err(ours(batch).logits, ref, batch["attention_mask"]) <= REL_TOL


@pytest.mark.parametrize("version", ["5.23.0", "4.57.0.dev0"])
def test_saved_checkpoint_converts_from_directory(hf, tmp_path, version):
    """transformers 5 saves fused experts as `[E, 2F, D]`; 4.x (the published checkpoints)
    wrote `[E, D, 2F]`: rewritten here with that version stamp, both load the same model."""
    hf.save_pretrained(tmp_path)
    if version.startswith("4"):
        from safetensors.numpy import load_file, save_file

        file = tmp_path / "model.safetensors"
        tensors = {k: (np.ascontiguousarray(np.swapaxes(v, 1, 2)) if ".mlp.experts." in k else v)
                   for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(dict(config,
                                                              transformers_version=version)))
    assert convert.experts_layout(json.loads((tmp_path / "config.json").read_text())) == (
        "torch" if version.startswith("5") else "published")
    ours = convert.from_directory(tmp_path)
    batch = make_batch(((1, 4, 6), (1, 6, 4)), [[0], [1]], 20)
    assert rel_err(ours(batch).logits, torch_logits(hf, batch), batch["attention_mask"]) <= REL_TOL


def test_bad_batches_get_clear_errors(hf):
    config = qvl.Qwen3VLMoeConfig.from_dict(hf.config.to_dict())
    batch = make_batch(((1, 4, 6), (1, 6, 4)), [[0], [1]], 20)
    with pytest.raises(ValueError, match="images give 10 features .* hold 12 image tokens"):
        qvl.prepare_batch(config, dict(batch, image_grid_thw=np.asarray([(1, 4, 6), (1, 4, 4)])))
    with pytest.raises(ValueError, match="no pixel_values"):
        qvl.prepare_batch(config, {k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="video inputs .* not supported"):
        qvl.prepare_batch(config, dict(batch, pixel_values_videos=batch["pixel_values"]))
    with pytest.raises(ValueError, match="disagree with the image tokens"):
        qvl.prepare_batch(config, dict(batch, mm_token_type_ids=np.zeros((2, 20), int)))
    with pytest.raises(ValueError, match="model_type 'llava' is not supported"):
        qvl.Qwen3VLMoeConfig.from_dict({"model_type": "llava"})


def test_missing_tensor_is_named(hf, tmp_path):
    sd = {k: v for k, v in hf.state_dict().items()
          if k != "model.visual.deepstack_merger_list.1.norm.weight"}
    config = qvl.Qwen3VLMoeConfig.from_dict(hf.config.to_dict())
    rules, ignore = convert.model_rules(config, "torch")
    with pytest.raises(mapping.MappingError, match="deepstack_merger_list.1.norm.scale"):
        mapping.convert(((k, v.numpy()) for k, v in sd.items()), rules,
                        convert.abstract_model(config), ignore=ignore)


def test_greedy_generation_matches_transformers(hf):
    """Prefill with images (M-RoPE, DeepStack), then cached steps whose positions carry the
    image's rope delta: the tokens of transformers' greedy `generate`."""
    batch = make_batch(((1, 4, 6), (1, 6, 4)), [[0], [1]], 20)
    ours = convert.from_torch(hf)
    got = generate.greedy_generate(ours, batch, max_new_tokens=6, eos_token_id=79)
    with torch.no_grad():
        ref = hf.generate(**{k: torch.tensor(v) for k, v in batch.items()}, max_new_tokens=6,
                          do_sample=False, eos_token_id=79, pad_token_id=0)
    ref = ref[:, batch["input_ids"].shape[1]:].numpy()
    np.testing.assert_array_equal(got.tokens[:, : ref.shape[1]], ref)


def test_left_padded_row_generates_as_alone(hf):
    ours = convert.from_torch(hf)
    padded = make_batch(((1, 4, 4), (1, 4, 8)), [[0, 1], []], 24, left_pad=3)
    alone = {k: v[:1, 3:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
             for k, v in padded.items()}
    both = generate.greedy_generate(ours, padded, max_new_tokens=5, eos_token_id=79)
    one = generate.greedy_generate(ours, alone, max_new_tokens=5, eos_token_id=79)
    np.testing.assert_array_equal(both.tokens[0], one.tokens[0])
