"""With ShareGPT data and no benchmark, the evaluate stage scores whole conversations that no
calibration draw took: next-token KL and perplexity over their text positions."""

import json
import types

import jax
import numpy as np
import pytest
import qwen3vl_tiny as tiny
from PIL import Image

from configs import common
from mode_jax import evaluation, preprocess
from mode_jax.calib import data, sources

DRAWN = {"num_freq_samples": 4, "num_sens_samples": 2, "num_gptq_samples": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny Qwen3-VL tokenizer and image processor with twelve ShareGPT records."""
    path = tiny.processor_dir(tmp_path_factory.mktemp("ckpt"))
    rng = np.random.default_rng(1)
    records = []
    for i in range(12):
        h, w = [(8, 12), (12, 8), (8, 8)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
            path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape"},
            {"from": "gpt", "value": "red circle" if i % 2 else "A"}]})
    (path / "calib.json").write_text(json.dumps(records))
    return path


def _config(path, num_samples=0):
    c = common.get_config()
    c.model.path = str(path)
    c.data.source = "sharegpt"
    c.data.calib_json = str(path / "calib.json")
    c.data.image_dir = str(path / "images")
    c.data.batch_size = 2
    c.data.update(DRAWN)
    c.eval.num_samples = num_samples
    return c


def test_heldout_records_are_the_ones_no_draw_takes():
    left = sources.heldout_indices(20, DRAWN, seed=7)
    used = set()
    for stage, field in sources.DRAWS:
        order = data.draw_order(20, 7 + sources.SEED_OFFSETS[stage])
        used |= set(order[:DRAWN[field]].tolist())
    order = data.draw_order(20, 7 + sources.SEED_OFFSETS["evaluate"]).tolist()
    assert left.tolist() == [i for i in order if i not in used]  # the evaluate draw's order
    assert len(left) >= 20 - 9
    assert not len(sources.heldout_indices(20, dict(DRAWN, num_gptq_samples=0), seed=7))


def test_drawn_indices_are_every_record_a_stage_reads():
    records = [{"id": str(i), "image": f"{i}.png"} for i in range(20)]
    want = set()
    for stage, field in sources.DRAWS:  # what each stage's draw returns
        order = data.draw_order(20, 7 + sources.SEED_OFFSETS[stage])
        want |= {records[i]["image"] for i in order[:DRAWN[field]]}
    left = sources.heldout_indices(20, DRAWN, seed=7)
    got = sources.drawn_indices(20, DRAWN, 7, heldout_take=0)
    assert {records[i]["image"] for i in got} == want
    got = sources.drawn_indices(20, DRAWN, 7, heldout_take=3)
    assert {records[i]["image"] for i in got} == want | {records[i]["image"] for i in left[:3]}
    assert len(sources.drawn_indices(20, dict(DRAWN, num_freq_samples=0), 7, 0)) == 20


def test_scores_the_text_positions_of_heldout_conversations(checkpoint):
    cfg = _config(checkpoint)
    batches, image_id = evaluation._next_token_batches(types.SimpleNamespace(config=cfg, cache={}),
                                                       tiny.CONFIG)
    left = sources.heldout_indices(12, cfg.data, cfg.seed)
    assert image_id == tiny.IMAGE and sum(len(b["input_ids"]) for b in batches) == len(left)
    model = tiny.model()
    same, _, per_sample = evaluation._next_token(model, model, batches, image_id)
    # brute force: mean negative log-likelihood of every real, non-image token after the first
    nll, count = 0.0, 0
    for batch in batches:
        logp = np.asarray(jax.nn.log_softmax(model(batch).logits.astype(np.float32), -1))
        ids, real = batch["input_ids"], batch["attention_mask"].astype(bool)
        for b in range(len(ids)):
            for t in range(1, ids.shape[1]):
                if real[b, t] and ids[b, t] != tiny.IMAGE:
                    nll -= logp[b, t - 1, ids[b, t]]
                    count += 1
    assert same["kl"] == 0 and same["n"] == len(left)
    assert per_sample["kl_tokens"].sum() == count
    np.testing.assert_allclose(same["perplexity"], np.exp(nll / count), rtol=1e-5)
    ctx = types.SimpleNamespace(config=_config(checkpoint, 2), cache={})
    few, _ = evaluation._next_token_batches(ctx, tiny.CONFIG)
    assert sum(len(b["input_ids"]) for b in few) == 2


def test_a_run_reads_the_file_and_the_tokenizer_once(checkpoint, monkeypatch):
    """Every stage's draw and the held-out set come from one parse of the ShareGPT file and one
    tokenizer load per run cache, and equal what separate reads give."""
    cfg = _config(checkpoint)
    calls = {"read": 0, "tokenizer": 0}
    read, load_tokenizer = data.read_sharegpt, preprocess.load_tokenizer

    def counted(name, fn):
        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapper

    def draws(cache):
        out = [sources.load(cfg.data, str(checkpoint), tiny.CONFIG, int(cfg.data[field]),
                            cfg.seed + sources.SEED_OFFSETS[stage],
                            "gptq" if stage == "quantize" else "stats", cache)
               for stage, field in sources.DRAWS]
        return out + [sources.heldout(cfg.data, str(checkpoint), tiny.CONFIG, 0, cfg.seed, cache)]

    fresh = draws(None)
    monkeypatch.setattr(data, "read_sharegpt", counted("read", read))
    monkeypatch.setattr(preprocess, "load_tokenizer", counted("tokenizer", load_tokenizer))
    cached = draws({})
    assert calls == {"read": 1, "tokenizer": 1}
    for a, b in zip(fresh, cached, strict=True):
        assert len(a.batches) == len(b.batches)
        for x, y in zip(a.batches, b.batches, strict=True):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
