"""main.py end to end on tiny Qwen3-VL-MoE and InternVL checkpoints written by transformers'
`save_pretrained`, each with a tokenizer (chat template) and its family's image processor:
calibration from a ShareGPT file, accuracy on a user JSONL benchmark, every stage; the
allocation meets the budget, and the packed artifact rebuilds a model of the same family whose
logits are close to the converted float model's. (Kimi-VL: test_pipeline_resume.py.)"""

import glob
import json
import os
import subprocess
import sys

import internvl_tiny
import numpy as np
import pytest
import qwen3vl_tiny
import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

import mode_jax
from mode_jax.calib import sources
from mode_jax.quant import serialize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_TEXT = dict(vocab_size=80, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=8, num_experts_per_tok=2, pad_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True})
QWEN_VISION = dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=2,
                   temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                   num_position_embeddings=16, deepstack_visual_indexes=[0])


def _qwen3_vl_moe(path):
    torch.manual_seed(0)
    cfg = Qwen3VLMoeConfig(text_config=QWEN_TEXT, vision_config=QWEN_VISION,
                           image_token_id=qwen3vl_tiny.IMAGE, video_token_id=75,
                           vision_start_token_id=58, vision_end_token_id=59)
    Qwen3VLMoeForConditionalGeneration(cfg).save_pretrained(path)
    qwen3vl_tiny.processor_dir(path)  # tokenizer + chat template, image processor, images
    return (2, 8)  # MoE layers x experts


def _internvl(path):
    internvl_tiny.processor_dir(path)  # checkpoint, tokenizer, image processor, images
    return (2, 4)


FAMILIES = {"qwen3_vl_moe": _qwen3_vl_moe, "internvl": _internvl}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_main_runs_every_stage(family, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    experts = FAMILIES[family](checkpoint)
    lines = [{"question": "what colour is the shape", "image": "images/0.png", "answer": "red"},
             {"question": "what is the shape", "image": "images/2.png",
              "options": ["red", "circle"], "answer_index": 1}]
    (checkpoint / "bench.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    work = tmp_path / "work"
    cmd = [sys.executable, "main.py", "--config=configs/tiny.py",
           f"--config.model.path={checkpoint}", f"--workdir={work}",
           "--config.alloc.budget_bits=3.0", "--config.data.num_sens_samples=2",
           "--config.sens.hutchinson_probes=2", "--config.eval.max_new_tokens=3",
           "--config.data.source=sharegpt", f"--config.data.calib_json={checkpoint}/calib.json",
           f"--config.data.image_dir={checkpoint}/images",
           f"--config.eval.jsonl={checkpoint}/bench.jsonl"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (work / "report.md").read_text()
    assert "| mode/text+key | expert_mse | gptq |" in report and "accuracy" in report
    (qdir,) = glob.glob(str(work / "quantize" / "*"))
    qmodel, meta = serialize.restore(qdir)
    assert meta["family"] == family
    bits = np.asarray(meta["bit_map"])
    assert bits.shape == experts and abs(bits.mean() - 3.0) < 1e-9
    fp = mode_jax.load(str(checkpoint))
    batch = sources.random_batches(fp.config, 2, 2, seed=5)[0]
    ref = np.asarray(fp(batch).logits)
    err = np.abs(np.asarray(qmodel(batch).logits) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.5
