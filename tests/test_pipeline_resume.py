"""SIGKILL during each stage, rerun the same command: artifacts equal an uninterrupted run's.

Also: a changed config field reruns only the stages downstream of it.
"""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from mode_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _cmd(workdir, *flags):
    return [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]


def _run(workdir, *flags):
    proc = subprocess.run(_cmd(workdir, *flags), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _kill_during(workdir, stage):
    """Start a run, SIGKILL it as soon as `stage` starts running; return whether it did."""
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if re.search(rf"stage {stage}\s+running", line):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.wait()
    return False


def _artifacts(workdir):
    out = {}
    for stage in sorted(os.listdir(workdir)):
        root = os.path.join(workdir, stage)
        if not os.path.isdir(root) or stage in ("figures", "bitmaps"):
            continue
        for fp in os.listdir(root):
            arrays, meta = checkpoint.load(os.path.join(root, fp))
            out[(stage, fp)] = arrays
    return out


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def test_sigkill_in_every_stage_then_resume(tmp_path):
    ref = str(tmp_path / "ref")
    log = _run(ref)
    stages = re.findall(r"stage (\w+)\s+running", log)
    assert len(stages) >= 4, log
    want = _artifacts(ref)

    work = str(tmp_path / "killed")
    killed = [s for s in stages if _kill_during(work, s)]
    assert killed == stages  # each stage was entered and killed in turn
    _run(work)
    got = _artifacts(work)
    assert sorted(got) == sorted(want)
    for key, arrays in want.items():
        a, b = dict(_flat(arrays)), dict(_flat(got[key]))
        assert sorted(a) == sorted(b), key
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]),
                                          err_msg=f"{key} {name}")
    assert not any(n.startswith(".tmp-") for s in os.listdir(work)
                   if os.path.isdir(os.path.join(work, s))
                   for n in os.listdir(os.path.join(work, s)))


def test_changed_field_reruns_only_downstream(tmp_path):
    work = str(tmp_path / "w")
    _run(work)
    log = _run(work, "--config.alloc.budget_bits=2.5", "--config.alloc.bits=(2,3)")
    ran = set(re.findall(r"stage (\w+)\s+running", log))
    assert "convert" not in ran and "calibrate" not in ran
    assert "allocate" in ran
