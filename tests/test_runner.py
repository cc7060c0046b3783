"""Stage runner: reuse, downstream-only reruns, interrupted stages, refusal of stale artifacts."""

import json
import os

import ml_collections
import numpy as np
import pytest

from mode_jax import runner


def _config():
    c = ml_collections.ConfigDict({"a": {"x": 1}, "b": {"y": (2, 3)}})
    c.lock()
    return c


def _stages(calls, fail_in=None):
    def first(ctx, inputs):
        calls.append("first")
        return {"v": np.arange(3) * ctx.config.a.x}, {"n": 1}

    def second(ctx, inputs):
        calls.append("second")
        if fail_in == "second":
            raise KeyboardInterrupt  # a kill in the middle of the stage
        v = inputs["first"].arrays["v"] + sum(ctx.config.b.y)
        return {"w": v}, {}

    return {
        "first": runner.Stage("first", (), ("a",), first),
        "second": runner.Stage("second", ("first",), ("b",), second),
    }


def test_reuse_and_downstream_rerun(tmp_path):
    calls = []
    cfg = _config()
    ctx = runner.Context(cfg, str(tmp_path), _stages(calls))
    np.testing.assert_array_equal(ctx.ensure("second").arrays["w"], [5, 6, 7])
    assert calls == ["first", "second"]

    calls.clear()
    runner.Context(cfg, str(tmp_path), _stages(calls)).ensure("second")
    assert calls == []  # everything reused

    calls.clear()
    cfg2 = _config()
    cfg2.unlock()
    cfg2.b.y = (4,)
    out = runner.Context(cfg2, str(tmp_path), _stages(calls)).ensure("second")
    assert calls == ["second"]  # only the stage the field feeds
    np.testing.assert_array_equal(out.arrays["w"], [4, 5, 6])


def test_interrupted_stage_resumes_without_losing_earlier_ones(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        runner.Context(_config(), str(tmp_path), _stages(calls, fail_in="second")).ensure("second")
    assert calls == ["first", "second"]
    second_dir = tmp_path / "second"
    assert not second_dir.exists() or not any(second_dir.iterdir())  # nothing half-written
    calls.clear()
    runner.Context(_config(), str(tmp_path), _stages(calls)).ensure("second")
    assert calls == ["second"]


def test_refuses_artifact_with_other_config(tmp_path):
    ctx = runner.Context(_config(), str(tmp_path), _stages([]))
    art = ctx.ensure("first")
    meta_path = os.path.join(art.path, "meta.json")
    doc = json.load(open(meta_path))
    doc["meta"]["recorded_config"]["config"]["a"] = {"x": 99}
    json.dump(doc, open(meta_path, "w"))
    with pytest.raises(runner.UserError, match="different config .*fields: a"):
        runner.Context(_config(), str(tmp_path), _stages([])).ensure("first")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(runner.UserError, match="not writable"):
        runner.check_workdir(str(blocker / "sub"))
    with pytest.raises(runner.UserError, match="is a file, not a directory"):
        runner.check_workdir(str(blocker))


@pytest.mark.parametrize("damage", ["truncated meta", "lost array file"])
def test_a_damaged_artifact_is_named_with_what_to_do(tmp_path, damage):
    art = runner.Context(_config(), str(tmp_path), _stages([])).ensure("first")
    if damage == "truncated meta":
        with open(os.path.join(art.path, "meta.json"), "w") as f:
            f.write('{"meta":')
    else:
        arrays = os.path.join(art.path, "arrays")
        for root, _, files in os.walk(arrays):
            for name in files:
                if "ocdbt" in root or name.startswith("ocdbt") or name == "manifest.ocdbt":
                    os.remove(os.path.join(root, name))
    with pytest.raises(runner.UserError, match=rf"artifact {art.path} is unreadable .*"
                                               rf"remove it \(rm -r {art.path}\) and rerun"):
        runner.Context(_config(), str(tmp_path), _stages([])).ensure("first")


def test_a_new_stored_layout_reruns_that_stage_and_what_follows_only(tmp_path):
    """A stage's `layout` (the quantize stage's bit layout) joins its fingerprint: artifacts of
    another layout are recomputed, never misread, and stages without one keep theirs."""
    calls = []
    cfg = _config()

    def stages(layout):
        s = _stages(calls)
        s["second"] = runner.Stage("second", ("first",), ("b",), s["second"].run, layout=layout)
        s["third"] = runner.Stage("third", ("second",), (), lambda ctx, i: ({}, {"t": 1}))
        return s

    old = runner.Context(cfg, str(tmp_path), stages("packing/1"))
    old.ensure("third")
    new = runner.Context(cfg, str(tmp_path), stages("packing/2"))
    assert new.fingerprint("first") == old.fingerprint("first")
    assert new.fingerprint("second") != old.fingerprint("second")
    assert new.fingerprint("third") != old.fingerprint("third")
    calls.clear()
    new.ensure("third")
    assert calls == ["second"]
    assert runner.Context(cfg, str(tmp_path), _stages([])).fingerprint("second") not in (
        old.fingerprint("second"), new.fingerprint("second"))  # no layout: the bare record


def test_files_named_by_content_keys_are_keyed_by_their_bytes(tmp_path):
    """A checkpoint rewritten in place reruns its stage and what follows; the same bytes at
    another path reuse every artifact; a missing file is one clear error."""
    calls = []
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.bin").write_bytes(b"old")

    def config(path):
        c = ml_collections.ConfigDict({"a": {"x": 1, "path": str(path)}, "b": {"y": (2,)}})
        c.lock()
        return c

    def stages():
        s = _stages(calls)
        s["first"] = runner.Stage("first", (), ("a.x",), s["first"].run,
                                  content_keys=("a.path",))
        return s

    work = str(tmp_path / "work")
    runner.Context(config(ckpt), work, stages()).ensure("second")
    assert calls == ["first", "second"]
    calls.clear()
    (ckpt / "weights.bin").write_bytes(b"new")  # same path, other weights
    runner.Context(config(ckpt), work, stages()).ensure("second")
    assert calls == ["first", "second"]
    calls.clear()
    moved = tmp_path / "moved"
    os.rename(ckpt, moved)
    runner.Context(config(moved), work, stages()).ensure("second")
    assert calls == []
    with pytest.raises(runner.UserError, match=r"cannot read .*gone.* to fingerprint it"):
        runner.Context(config(tmp_path / "gone"), work, stages()).ensure("second")


def test_pipeline_fingerprints_follow_checkpoint_and_calibration_bytes_not_paths(tmp_path):
    """The real stage table: the tiny fixture copied elsewhere (and its calibration JSON moved)
    gives every stage the same fingerprint; one changed byte of either changes them."""
    import shutil

    from configs import tiny
    from mode_jax import stages

    def fingerprints(model, calib):
        c = tiny.get_config()
        c.model.path, c.data.calib_json = str(model), str(calib)
        ctx = runner.Context(stages.method_config(c, c.alloc.method), str(tmp_path / "w"),
                             stages.STAGES)
        return {name: ctx.fingerprint(name) for name in stages.STAGES}

    model = tmp_path / "a" / "model"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "kimivl-tiny"), model)
    calib = tmp_path / "a" / "calib.json"
    calib.write_text("[]")
    base = fingerprints(model, calib)
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    assert fingerprints(moved / "model", moved / "calib.json") == base
    (moved / "calib.json").write_text("[ ]")
    changed = fingerprints(moved / "model", moved / "calib.json")
    assert changed["convert"] == base["convert"] and changed["calibrate"] != base["calibrate"]
    config = moved / "model" / "config.json"
    config.write_text(config.read_text() + " ")
    assert fingerprints(moved / "model", moved / "calib.json")["convert"] != base["convert"]
