"""Bad input to main.py: one clear line on stderr, exit code 2, nothing written to the workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(forks, tmp_path, *flags, workdir=None, config="configs/tiny.py", env=None):
    """main.py with these flags: forked from the suite's server (conftest.py, main_forks.py)
    unless `env` is given, which needs a process started from scratch."""
    workdir = workdir or str(tmp_path / "work")
    argv = ["main.py", f"--config={config}", f"--workdir={workdir}", *flags]
    if env is None:
        return forks.run(argv), workdir
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
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
    "zero batch size": (["--config.data.batch_size=0"], ("data.batch_size=0", ">= 1")),
    "zero calibration samples": (["--config.data.num_freq_samples=0"],
                                 ("data.num_freq_samples=0", ">= 1 with data.source='random'")),
    "negative held-out samples": (["--config.eval.num_samples=-1"], ("eval.num_samples=-1",)),
    "zero new tokens": (["--config.eval.max_new_tokens=0"], ("eval.max_new_tokens=0",)),
    "huge new tokens": (["--config.eval.max_new_tokens=1000000000"],
                        ("eval.max_new_tokens=1000000000", "at most 4096")),
    "negative seed": (["--config.seed=-1"], ("seed=-1",)),
    "zero expert axis": (["--config.mesh.expert=0"], ("mesh.expert=0",)),
    "infinite budget": (["--config.alloc.budget_bits=inf"], ("alloc.budget_bits=inf", "finite")),
    "nan budget": (["--config.alloc.budget_bits=nan"], ("alloc.budget_bits=nan", "finite")),
    "unpackable bit-width": (["--config.alloc.bits=(2,3,16)"], ("alloc.bits=(2, 3, 16)",
                                                                 "(1, 2, 3, 4, 8)")),
    "unknown solver": (["--config.alloc.solver=gurobi"], ("alloc.solver='gurobi'", "scip, dp")),
    "vision mix above one": (["--config.alloc.vision_mix=1.5"], ("alloc.vision_mix=1.5",)),
    "unknown attention mode": (["--config.stats.attention_mode=mean"], ("stats:", "mean")),
    "key ratio zero": (["--config.stats.key_ratio=0.0"], ("stats:", "key_ratio")),
    "judge layer out of range": (["--config.stats.judge_layer=9"], ("stats.judge_layer=9",
                                                                     "decoder layers")),
    "unknown quantizer": (["--config.quant.method=awq"], ("quant:", "awq")),
    "bad group size": (["--config.quant.group_size=7"], ("quant:", "group_size=7")),
    "bad attention bits": (["--config.quant.attention_bits=5"], ("quant:", "attention_bits=5")),
    "unknown final stage": (["--config.final_stage=report"], ("final_stage", "report",
                                                                "quantize")),
    "unknown kernel dequant": (["--config.eval.kernel_dequant=lut"],
                               ("eval.kernel_dequant", "lut", "registers")),
    "process flags without --distributed": (["--num_processes=2", "--process_id=1"],
                                            ("need --distributed",)),
    "--distributed outside a cluster": (["--distributed"], ("cannot start the distributed job",
                                                            "coordinator_address")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_flags(forks, tmp_path, name):
    flags, needles = CASES[name]
    _assert_user_error(*_run(forks, tmp_path, *flags), *needles)


def test_calibration_json_with_missing_image(forks, tmp_path):
    path, img_dir = _calib_json(tmp_path, missing=True)
    proc, workdir = _run(forks, tmp_path, "--config.data.source=sharegpt",
                         f"--config.data.calib_json={path}", f"--config.data.image_dir={img_dir}")
    _assert_user_error(proc, workdir, "gone.png")


def test_unwritable_workdir(forks, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc, _ = _run(forks, tmp_path, workdir=str(blocker / "sub"))
    assert proc.returncode == 2 and "not writable" in proc.stderr.strip().splitlines()[-1]


def test_calibration_json_with_nothing_left_to_evaluate(forks, tmp_path):
    """Without a benchmark the evaluate stage scores held-out records; the tiny config's draws
    take the file's only record, which is named before any stage runs."""
    path, img_dir = _calib_json(tmp_path, missing=False)
    proc, workdir = _run(forks, tmp_path, "--config.data.source=sharegpt",
                         f"--config.data.calib_json={path}", f"--config.data.image_dir={img_dir}")
    _assert_user_error(proc, workdir, "all 1 image records", "none is left to evaluate on",
                       "--config.eval.jsonl")


def test_text_only_checkpoint_is_refused_before_anything_is_written(forks, tmp_path):
    """A deepseek_v3 (text-only) directory loads as a model, but MODE calibrates on images."""
    shipped = json.loads(open(os.path.join(REPO, "checkpoints/testbed/config.json")).read())
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps(shipped["text_config"]))
    proc, workdir = _run(forks, tmp_path, f"--config.model.path={text_only}",
                         "--config.data.source=random")
    _assert_user_error(proc, workdir, str(text_only), "no vision tower", "internvl")


def test_config_file_with_a_syntax_error(forks, tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config(:\n    pass\n")
    _assert_user_error(*_run(forks, tmp_path, config=bad), "bad flag or config", "invalid syntax")


def test_a_positional_argument_is_one_line(forks, tmp_path):
    proc, workdir = _run(forks, tmp_path, "extra")
    _assert_user_error(proc, workdir, "unexpected arguments ['extra']")


def test_compilation_cache_that_is_a_file(forks, tmp_path):
    blocker = tmp_path / "cache_file"
    blocker.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc, workdir = _run(forks, tmp_path, f"--config.compilation_cache={blocker}", env=env)
    _assert_user_error(proc, workdir, "compilation_cache=", "cache_file")


def test_benchmark_jsonl_is_checked_before_any_stage(forks, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "what?", "answer": "red"}) + "\n" +
                     json.dumps({"question": "what?", "answer": "red", "image": "gone.png"}))
    proc, workdir = _run(forks, tmp_path, f"--config.eval.jsonl={bench}")
    _assert_user_error(proc, workdir, "bench.jsonl:2", "gone.png", "not found")


def test_checkpoint_without_moe_layers_is_refused(forks, tmp_path):
    config = json.loads(open(os.path.join(REPO, "checkpoints/testbed/config.json")).read())
    config["text_config"]["first_k_dense_replace"] = config["text_config"]["num_hidden_layers"]
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps(config))
    proc, workdir = _run(forks, tmp_path, f"--config.model.path={dense}",
                         "--config.data.source=random")
    _assert_user_error(proc, workdir, "no MoE layer (of 4)", "no routed experts")


def test_unreadable_calibration_image_is_named_before_any_stage(forks, tmp_path):
    path, img_dir = _calib_json(tmp_path, missing=False)
    records = json.loads(open(path).read())
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "img" / "full.png")
    body = (tmp_path / "img" / "full.png").read_bytes()  # a good header, half a body
    (tmp_path / "img" / "cut.png").write_bytes(body[:len(body) // 2])
    records.append({**records[0], "id": "r1", "image": "empty.png"})
    records.append({**records[0], "id": "r2", "image": "cut.png"})
    open(path, "w").write(json.dumps(records))
    proc, workdir = _run(forks, tmp_path, "--config.data.source=sharegpt",
                         f"--config.data.calib_json={path}", f"--config.data.image_dir={img_dir}",
                         "--config.final_stage=quantize")  # every record is drawn
    _assert_user_error(proc, workdir, "2 calibration image(s) cannot be read", "id 'r1'",
                       "empty.png", "id 'r2'), cut.png: image file is truncated")


def test_expert_axis_that_does_not_divide_the_devices(forks, tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    proc, workdir = _run(forks, tmp_path, "--config.mesh.expert=3", env=env)
    _assert_user_error(proc, workdir, "mesh.expert=3 does not divide the 4 devices")


def test_zero_draws_mean_every_sharegpt_record():
    """`data.num_*_samples = 0` draws every record of a ShareGPT file, so it is allowed there;
    the synthetic sources have no "every record" and refuse it."""
    from configs import common
    from mode_jax import stages

    c = common.get_config()
    c.data.num_freq_samples = 0
    stages._validate_settings(c)  # sharegpt (the default source): no error
    c.data.source = "testbed"
    with pytest.raises(stages.UserError, match="num_freq_samples=0: must be an integer >= 1"):
        stages._validate_settings(c)
    c.data.num_freq_samples, c.data.lengths_per_doubling = 1, -1
    with pytest.raises(stages.UserError, match="lengths_per_doubling=-1: must be an integer >= 0"):
        stages._validate_settings(c)


def test_unreadable_preprocessor_config_is_named_before_any_stage(forks, tmp_path):
    shipped = os.path.join(REPO, "checkpoints", "testbed")
    copy = tmp_path / "testbed"
    copy.mkdir()
    for name in os.listdir(shipped):
        (copy / name).symlink_to(os.path.join(shipped, name))
    (copy / "preprocessor_config.json").unlink()
    (copy / "preprocessor_config.json").write_text("{not json")
    proc, workdir = _run(forks, tmp_path, f"--config.model.path={copy}",
                         config="configs/testbed.py")
    _assert_user_error(proc, workdir, "preprocessor_config.json could not be read")


def test_prompt_longer_than_max_length_is_named_before_convert(forks, tmp_path):
    """The longest prompt any stage would build (here a whole conversation for GPTQ) is named
    with the max_length it needs, before convert writes anything."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    records = []
    for i, (w, h) in enumerate([(28, 28), (640, 480), (300, 200)]):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(img_dir / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle ?"},
            {"from": "gpt", "value": "red"}]})
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(records))
    flags = ("--config.data.source=sharegpt", f"--config.data.calib_json={path}",
             f"--config.data.image_dir={img_dir}", "--config.final_stage=quantize")
    proc, workdir = _run(forks, tmp_path, *flags, "--config.data.max_length=64",
                         config="configs/testbed.py")
    from mode_jax import preprocess
    from mode_jax.calib import data, sources
    from mode_jax.models import kimivl

    testbed = os.path.join(REPO, "checkpoints/testbed")
    config = kimivl.KimiVLConfig.from_dict(json.loads(open(f"{testbed}/config.json").read()))
    build = sources._builder(testbed, config, preprocess.load_tokenizer(testbed))
    sample = data.record_sample(records[1], str(img_dir), human_only=False)
    longest = build([sample.messages], [sample.images])["input_ids"].shape[1]
    _assert_user_error(proc, workdir, "2 calibration record(s)", "data.max_length=64",
                       "whole conversation of image record 1 (id 'r1', image 640x480)",
                       f"at least {longest}")


def test_generation_config_with_an_end_token_outside_the_vocabulary(forks, tmp_path):
    """Evaluation stops at the end tokens of generation_config.json; a bad one is named before
    convert, not when evaluate starts generating."""
    shipped = os.path.join(REPO, "checkpoints/testbed")
    copy = tmp_path / "testbed"
    copy.mkdir()
    for name in os.listdir(shipped):
        (copy / name).symlink_to(os.path.join(shipped, name))
    (copy / "generation_config.json").unlink()
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [8, 99999]}))
    proc, workdir = _run(forks, tmp_path, f"--config.model.path={copy}",
                         config="configs/testbed.py")
    _assert_user_error(proc, workdir, "generation_config.json: eos_token_id [99999] lies outside")


def test_a_thinking_template_is_recognised():
    """A generation prompt that opens a <think> block (Qwen3-VL Thinking) gets a warning that
    greedy answers are reasoning; an ordinary template does not."""
    from mode_jax import preprocess, stages

    tok = preprocess.load_tokenizer(os.path.join(REPO, "checkpoints/testbed"))
    assert not stages.opens_reasoning(tok)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n")
    assert stages.opens_reasoning(tok)


def test_statistics_prompts_missing_their_records_images_are_noted(forks, tmp_path):
    """Statistics read a record's first user turn; a record whose <image> placeholders stand in
    later turns is named in a warning before convert, with how many of its images it keeps."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(img_dir / f"{name}.png")
    late = {"id": "late", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "<image> and <image>: which is brighter?"},
        {"from": "gpt", "value": "the first"}]}
    early = {"id": "early", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "black"}]}
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([late, early, early | {"id": "early2"}]))
    flags = ("--config.data.source=sharegpt", f"--config.data.calib_json={path}",
             f"--config.data.image_dir={img_dir}", "--config.final_stage=convert")
    proc, _ = _run(forks, tmp_path, *flags, config="configs/testbed.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("1 of the 3 statistics prompts hold fewer images than their record (1 none)"
            in proc.stderr), proc.stderr[-3000:]
    assert "image record 0 (id 'late'), 0 of its 2 images" in proc.stderr
