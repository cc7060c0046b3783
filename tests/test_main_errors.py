"""Bad input to main.py: one clear line on stderr, exit code 2, nothing written to the workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *flags, workdir=None):
    workdir = workdir or str(tmp_path / "work")
    cmd = [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc, workdir


def _assert_user_error(proc, workdir, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr[proc.stderr.index("error:"):]  # may list several problems
    for needle in needles:
        assert needle in message, message
    if os.path.isdir(workdir):  # nothing but the (empty) workdir itself
        assert os.listdir(workdir) == []


def _calib_json(tmp_path, missing: bool):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img_dir / "a.png")
    rec = {"id": "r0", "image": "gone.png" if missing else "a.png",
           "conversations": [{"from": "human", "value": "<image>\nwhat?"}]}
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([rec]))
    return str(path), str(img_dir)


CASES = {
    "config typo": (["--config.alloc.budgte_bits=2"], ("budget_bits",)),
    "missing model path": (["--config.model.path=/nonexistent/model"], ("/nonexistent/model",)),
    "unknown method": (["--config.alloc.method=magic"], ("magic",)),
    "infeasible budget": (["--config.alloc.budget_bits=5.0"], ("infeasible bit budget",)),
    "unknown estimator": (["--config.sens.estimator=guess"], ("guess",)),
    "unknown sensitivity quantizer": (["--config.sens.quantizer=awq"], ("sens.quantizer", "awq")),
    "unknown matmul precision": (["--config.model.matmul_precision=tf33"], ("tf33",)),
    "unknown trace curvature": (["--config.sens.trace_curvature=fisher"],
                                ("sens.trace_curvature", "fisher")),
    "negative trace block": (["--config.sens.trace_layers_per_pass=-2"],
                             ("sens.trace_layers_per_pass", "-2")),
    "zero logit_kl chunk": (["--config.sens.kl_chunk=0"], ("sens.kl_chunk", "0")),
    "negative trace batch": (["--config.sens.trace_batch_size=-1"],
                             ("sens.trace_batch_size", "-1")),
    "unknown data source": (["--config.data.source=web"], ("data.source", "web")),
    "unknown statistics tasks": (["--config.data.testbed_stats_tasks=text"],
                                 ("data.testbed_stats_tasks", "text")),
    "unknown final stage": (["--config.final_stage=report"], ("final_stage", "report",
                                                                "quantize")),
    "unknown kernel dequant": (["--config.eval.kernel_dequant=lut"],
                               ("eval.kernel_dequant", "lut", "registers")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_flags(tmp_path, name):
    flags, needles = CASES[name]
    _assert_user_error(*_run(tmp_path, *flags), *needles)


def test_calibration_json_with_missing_image(tmp_path):
    path, img_dir = _calib_json(tmp_path, missing=True)
    proc, workdir = _run(tmp_path, "--config.data.source=sharegpt",
                         f"--config.data.calib_json={path}", f"--config.data.image_dir={img_dir}")
    _assert_user_error(proc, workdir, "gone.png")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc, _ = _run(tmp_path, workdir=str(blocker / "sub"))
    assert proc.returncode == 2 and "not writable" in proc.stderr.strip().splitlines()[-1]


def test_calibration_json_with_nothing_left_to_evaluate(tmp_path):
    """Without a benchmark the evaluate stage scores held-out records; the tiny config's draws
    take the file's only record, which is named before any stage runs."""
    path, img_dir = _calib_json(tmp_path, missing=False)
    proc, workdir = _run(tmp_path, "--config.data.source=sharegpt",
                         f"--config.data.calib_json={path}", f"--config.data.image_dir={img_dir}")
    _assert_user_error(proc, workdir, "all 1 image records", "none is left to evaluate on",
                       "--config.eval.jsonl")


def test_text_only_checkpoint_is_refused_before_anything_is_written(tmp_path):
    """A deepseek_v3 (text-only) directory loads as a model, but MODE calibrates on images."""
    shipped = json.loads(open(os.path.join(REPO, "checkpoints/testbed/config.json")).read())
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps(shipped["text_config"]))
    proc, workdir = _run(tmp_path, f"--config.model.path={text_only}",
                         "--config.data.source=random")
    _assert_user_error(proc, workdir, str(text_only), "no vision tower", "internvl")
