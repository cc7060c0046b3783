"""Qwen3-VL calibration batches from a checkpoint directory's tokenizer (chat template) and
image processor, through the sharegpt source, fed to a tiny Qwen3-VL-MoE."""

import numpy as np
import pytest
import qwen3vl_tiny as tiny
from PIL import Image

from configs import common
from mode_jax import preprocess_qwen3vl as pq
from mode_jax.calib import passes, sources


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tiny.processor_dir(tmp_path_factory.mktemp("ckpt"))


def test_sharegpt_batches_in_qwen3vl_format(checkpoint_dir):
    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=str(checkpoint_dir / "calib.json"),
                    image_dir=str(checkpoint_dir / "images"), batch_size=2,
                    max_length=0))
    calib = sources.load(cfg, str(checkpoint_dir), tiny.CONFIG, 3, 0, "stats")
    assert calib.image_token_id == tiny.IMAGE and len(calib.batches) == 2
    processor = pq.load_image_processor(checkpoint_dir)
    total = 0
    for batch in calib.batches:
        grids = batch["image_grid_thw"]
        per_row = (batch["input_ids"] == tiny.IMAGE).sum(1)
        np.testing.assert_array_equal(per_row, grids.prod(1) // 4)  # one image per row
        np.testing.assert_array_equal(batch["mm_token_type_ids"], batch["input_ids"] == tiny.IMAGE)
        assert batch["input_ids"].shape[1] % 32 == 0  # bucketed lengths
        assert batch["pixel_values"].shape == (grids.prod(1).sum(), 24)
        total += len(grids)
    assert total == 3
    # the pixels are the image processor's own for those images, in the shuffled order
    order = [int(i) for i in np.random.default_rng(0).permutation(3)]
    ref = processor(images=[Image.open(checkpoint_dir / "images" / f"{i}.png").convert("RGB")
                            for i in order[:2]], return_tensors="np")
    np.testing.assert_allclose(calib.batches[0]["pixel_values"], ref["pixel_values"], rtol=1e-6)
    # the tiny model takes them: statistics run on real prompts
    model = tiny.model()
    stats = passes.frequency_pass(model, calib.batches, passes.StatsConfig(
        calib.image_token_id, calib.special_token_ids))
    assert int(stats["num_tokens_image"]) == int(sum((b["input_ids"] == tiny.IMAGE).sum()
                                                     for b in calib.batches))


def test_missing_image_processor_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        pq.load_image_processor(tmp_path)
    with pytest.raises(ValueError, match="1 image placeholder.* 2 image"):
        pq.expand_image_pads("a <|image_pad|> b", np.ones((2, 3), int), 2)


def test_chat_template_from_the_processor_files(checkpoint_dir, tmp_path):
    """Qwen3-VL ships its image-aware template in chat_template.json (the processor's); it wins
    over a tokenizer's own, and with no template anywhere the batch builder says so instead of
    falling back to Kimi-VL's hand-written format."""
    import json
    import shutil

    from mode_jax import preprocess

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, d)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    text_only = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": text_only}))
    assert preprocess.load_tokenizer(d).chat_template == text_only
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = preprocess.load_tokenizer(d)
    assert tokenizer.chat_template == template
    processor = pq.load_image_processor(d)
    image = Image.open(d / "images" / "0.png")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}]
    batch = pq.build_batch([conv], [[image]], tokenizer, processor)
    assert (batch["input_ids"] == tiny.IMAGE).sum() == batch["image_grid_thw"].prod() // 4
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="Qwen3-VL tokenizer has no chat template"):
        pq.build_batch([conv], [[image]], tokenizer, processor)
    (d / "chat_template.json").write_text("[")
    with pytest.raises(ValueError, match="chat_template.json could not be read"):
        preprocess.load_tokenizer(d)


def test_calibration_batches_hold_one_image_grid_each(checkpoint_dir, tmp_path):
    """Drawn from images of three sizes, two of which share a grid, the calibration's batches
    each hold one grid (one tuple of static grids, so one compiled program per pass), and they
    hold the draw's samples. Neither the shuffle nor grouping by pixel size would do it here."""
    import json

    images = tmp_path / "images"  # 0.png is 12 x 8, 1.png 8 x 12 (fixture); 2.png 13 x 8
    images.mkdir()
    for name in ("0.png", "1.png"):
        (images / name).write_bytes((checkpoint_dir / "images" / name).read_bytes())
    Image.new("RGB", (13, 8)).save(images / "2.png")
    drawn = ["0.png", "1.png", "2.png", "1.png", "0.png", "1.png", "2.png", "1.png"]
    order = np.random.default_rng(0).permutation(len(drawn))  # the stats draw with seed 0
    names = [None] * len(drawn)
    for k, i in enumerate(order):
        names[i] = drawn[k]
    record = json.loads((checkpoint_dir / "calib.json").read_text())[0]
    calib_json = tmp_path / "calib.json"
    calib_json.write_text(json.dumps([dict(record, id=str(i), image=name)
                                      for i, name in enumerate(names)]))
    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=str(calib_json), image_dir=str(images),
                    batch_size=4, max_length=0))
    calib = sources.load(cfg, str(checkpoint_dir), tiny.CONFIG, len(drawn), 0, "stats")
    grids = [tuple(map(tuple, b["image_grid_thw"].tolist())) for b in calib.batches]
    assert len(grids) == 2 and all(len(set(g)) == 1 and len(g) == 4 for g in grids), grids
    assert grids == [((1, 4, 6),) * 4, ((1, 6, 4),) * 4]  # 0.png's and 2.png's grid first
    # by pixel size the groups would be 0 0 1 1 | 1 1 2 2: both batches mixed


def test_long_prompts_pad_to_few_lengths_and_the_statistics_do_not_see_it(checkpoint_dir,
                                                                          tmp_path):
    """Above 512 tokens the calibration batches are padded to one of 8 lengths per doubling
    (multiples of 64 up to 1024), not to every multiple of 32: fewer programs to compile. The
    padding is masked, so the frequency statistics are those of the 32-token padding."""
    import json

    record = json.loads((checkpoint_dir / "calib.json").read_text())[0]
    words = [f"w{i % 40}" for i in range(900)]
    records = [dict(record, id=str(i), conversations=[
        {"from": "human", "value": "<image>\n" + " ".join(words[:n])},
        {"from": "gpt", "value": "A"}]) for i, n in enumerate((500, 530, 560, 600, 650, 880))]
    calib_json = tmp_path / "calib.json"
    calib_json.write_text(json.dumps(records))
    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=str(calib_json),
                    image_dir=str(checkpoint_dir / "images"), batch_size=1, max_length=0))
    runs = {}
    for per_doubling in (8, 0):
        cfg.lengths_per_doubling = per_doubling
        runs[per_doubling] = sources.load(cfg, str(checkpoint_dir), tiny.CONFIG, len(records),
                                          0, "stats")
    real = [int(b["attention_mask"].sum()) for b in runs[0].batches]
    assert min(real) > 512 and max(real) < 1024
    for per_doubling, step in ((8, 64), (0, 32)):
        lengths = [b["input_ids"].shape[1] for b in runs[per_doubling].batches]
        assert lengths == [-(-t // step) * step for t in real], (per_doubling, lengths, real)
    assert len({b["input_ids"].shape[1] for b in runs[8].batches}) < len(set(
        b["input_ids"].shape[1] for b in runs[0].batches))
    model = tiny.model()
    stats = [passes.frequency_pass(model, runs[p].batches, passes.StatsConfig(
        runs[p].image_token_id, runs[p].special_token_ids)) for p in (8, 0)]
    assert stats[0].keys() == stats[1].keys()
    for key in stats[0]:
        np.testing.assert_allclose(np.asarray(stats[0][key]), np.asarray(stats[1][key]),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
