"""SIGKILL during each stage, rerun the same command: artifacts equal an uninterrupted run's.

Also: a changed config field reruns only the stages downstream of it; the same run split over
two `jax.distributed` processes writes what the uninterrupted run wrote.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from multiprocess_runs import distributed

from mode_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _argv(workdir, *flags):
    return ["main.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]


def _cmd(workdir, *flags):
    return [sys.executable, *_argv(workdir, *flags)]


def _run(forks, workdir, *flags):
    """A run forked from the suite's server (conftest.py): main.py's imports are done once.
    The reference run, the Ctrl-C run and the two-process run start main.py from scratch."""
    proc = forks.run(_argv(workdir, *flags), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _kill_during(forks, workdir, stage):
    """Start a run, SIGKILL it as soon as `stage` starts running; return whether it did."""
    run = forks.start(_argv(workdir))
    for line in run.stderr_lines(timeout=900):
        if re.search(rf"stage {stage}\s+running", line):
            run.kill()
            assert run.wait().returncode == -signal.SIGKILL
            return True
    run.wait()
    return False


def _artifacts(workdir):
    out = {}
    for stage in sorted(os.listdir(workdir)):
        root = os.path.join(workdir, stage)
        if not os.path.isdir(root) or stage in ("figures", "bitmaps") or stage.startswith("."):
            continue
        for fp in os.listdir(root):
            arrays, meta = checkpoint.load(os.path.join(root, fp))
            out[(stage, fp)] = arrays
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the tiny pipeline: (workdir, its log)."""
    ref = str(tmp_path_factory.mktemp("ref") / "work")
    proc = subprocess.run(_cmd(ref), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref, proc.stderr


def test_sigkill_in_every_stage_then_resume(tmp_path, reference, forks):
    ref, log = reference
    stages = re.findall(r"stage (\w+)\s+running", log)
    order = ["convert", "calibrate", "sensitivity", "allocate", "quantize", "evaluate"]
    assert stages == order, log
    want = _artifacts(ref)

    work = str(tmp_path / "killed")
    killed = [s for s in stages if _kill_during(forks, work, s)]
    assert killed == stages  # each stage was entered and killed in turn
    _run(forks, work)
    got = _artifacts(work)
    assert sorted(got) == sorted(want)
    for key, arrays in want.items():
        a, b = checkpoint.flatten(arrays), checkpoint.flatten(got[key])
        assert sorted(a) == sorted(b), key
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]),
                                          err_msg=f"{key} {name}")
    assert not any(n.startswith(".tmp-") for s in os.listdir(work)
                   if os.path.isdir(os.path.join(work, s))
                   for n in os.listdir(os.path.join(work, s)))


def test_thin_gptq_calibration_is_logged_and_reported(reference):
    """configs/tiny.py gives GPTQ 4 conversations: some experts see fewer tokens than their
    64-wide gate/up input, which the log and the report say, naming the flag that helps."""
    ref, log = reference
    said = re.search(r"quantize: \d+ routed expert\(s\) saw fewer GPTQ calibration tokens "
                     r"than an input width \(down 36, gate_up 64\)", log)
    assert said, log
    with open(os.path.join(ref, "report.md")) as f:
        notes = [line for line in f if "raise data.num_gptq_samples" in line]
    assert len(notes) == 1 and notes[0].rstrip().endswith("(every row)"), notes


def test_changed_field_reruns_only_downstream(tmp_path, reference, forks):
    work = str(tmp_path / "w")
    shutil.copytree(reference[0], work)
    log = _run(forks, work, "--config.quant.attention_bits=8")
    ran = re.findall(r"stage (\w+)\s+running", log)
    assert ran == ["quantize", "evaluate"], log
    with open(os.path.join(work, "report.md")) as f:  # both runs' rows, told apart
        quantizers = {line.split("|")[3].strip() for line in f if line.startswith("| mode/")}
    assert quantizers == {"gptq attention_bits=4", "gptq attention_bits=8"}, quantizers


def test_report_tells_rows_of_other_sensitivity_settings_apart(tmp_path, reference, forks):
    """Another estimator for MODE, and MoPEQ's trace by Gauss-Newton, in one rerun: the
    report's rows say which statistics each read."""
    work = str(tmp_path / "w")
    shutil.copytree(reference[0], work)
    log = _run(forks, work, "--config.sens.estimator=fisher",
               "--config.sens.trace_curvature=gauss_newton",
               "--config.sweep=('mode','mopeq-budget')")
    ran = re.findall(r"stage (\w+)\s+running", log)  # allocate, quantize once per method
    assert list(dict.fromkeys(ran)) == ["sensitivity", "allocate", "quantize", "evaluate"], log
    with open(os.path.join(work, "report.md")) as f:
        rows = [line.split("|") for line in f if line.startswith(("| mode/", "| mopeq-budget"))]
    estimators = sorted(r[2].strip() for r in rows if r[1].strip().startswith("mode/"))
    assert estimators == ["expert_mse", "fisher"], rows
    assert [r[2].strip() for r in rows if r[1].strip().startswith("mopeq-budget")] == [
        "gauss_newton trace"], rows


def test_matmul_precision_reruns_every_stage_that_computes(tmp_path, reference, forks):
    """The converted weights do not depend on it; every statistic and evaluation does."""
    work = str(tmp_path / "w")
    shutil.copytree(reference[0], work)
    log = _run(forks, work, "--config.model.matmul_precision=default")
    assert re.findall(r"stage (\w+)\s+running", log) == [
        "calibrate", "sensitivity", "allocate", "quantize", "evaluate"], log


def test_final_stage_stops_the_run_and_a_later_run_goes_on(tmp_path, reference, forks):
    work = str(tmp_path / "w")
    proc = forks.run(_argv(work, "--config.final_stage=sensitivity"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"stage (\w+)\s+running", proc.stderr) == [
        "convert", "calibrate", "sensitivity"], proc.stderr
    assert "done: sensitivity artifact at " + os.path.join(work, "sensitivity") in proc.stdout
    assert not os.path.exists(os.path.join(work, "report.md"))
    log = _run(forks, work, "--config.final_stage=quantize")
    assert re.findall(r"stage (\w+)\s+running", log) == ["allocate", "quantize"], log
    assert os.path.isfile(os.path.join(work, "report.md"))  # the bit map and earlier rows
    assert sorted(_artifacts(work)) == sorted(k for k in _artifacts(reference[0])
                                              if k[0] != "evaluate")


# A run started from a background job inherits SIGINT ignored (POSIX) and Python keeps it so,
# rightly; this test wants Ctrl-C delivered, so main.py runs with Python's handler restored.
# (A preexec_fn would do it too, but forces a fork of this multithreaded JAX process.)
_WITH_SIGINT = ("import runpy, signal, sys; "
                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_ctrl_c_says_how_to_resume(tmp_path):
    cmd = _cmd(str(tmp_path / "w"))
    proc = subprocess.Popen([cmd[0], "-c", _WITH_SIGINT, *cmd[1:]], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"stage sensitivity\s+running", line):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == ("interrupted: completed stages are kept; rerun the "
                                             "same command to resume")


def test_a_damaged_artifact_is_one_line_naming_it(tmp_path, reference, forks):
    work = str(tmp_path / "w")
    shutil.copytree(reference[0], work)
    convert = os.path.join(work, "convert", os.listdir(os.path.join(work, "convert"))[0])
    shutil.rmtree(os.path.join(convert, "arrays", "ocdbt.process_0"))
    proc = forks.run(_argv(work), timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: artifact {convert} is "
                                                           "unreadable")
    assert f"rm -r {convert}" in proc.stderr


def test_report_says_which_statistics_its_divergence_line_reads(tmp_path, reference, forks):
    """Rows of several runs share one report, the divergence line is the latest run's: it names
    that run's calibrate artifact and data settings, so a reader can tell."""
    def divergence_line(workdir):
        with open(os.path.join(workdir, "report.md")) as f:
            return next(line for line in f if line.startswith("Text vs key-vision"))

    (first,) = os.listdir(os.path.join(reference[0], "calibrate"))
    assert f"calibrate/{first} (source random, num_freq_samples 8)" in divergence_line(
        reference[0])
    work = str(tmp_path / "w")
    shutil.copytree(reference[0], work)
    _run(forks, work, "--config.data.num_freq_samples=4")
    (second,) = set(os.listdir(os.path.join(work, "calibrate"))) - {first}
    assert f"calibrate/{second} (source random, num_freq_samples 4)" in divergence_line(work)


def _untimed(meta):
    """Meta without wall-clock figures, which no two runs share."""
    if isinstance(meta, dict):
        return {k: _untimed(v) for k, v in meta.items()
                if k not in ("seconds", "solve_time_s")}
    return meta


def _assert_close(got, want, where: str, exact: bool, atol: float = 0.0, rtol: float = 1e-6):
    """Integers and strings equal; floats equal, or within `rtol` (and `atol`) where not
    `exact`."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}/{k}", exact, atol, rtol)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]", exact, atol, rtol)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        if exact or not np.issubdtype(want.dtype, np.floating):
            assert np.array_equal(got, want, equal_nan=True), where
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=where)
    elif isinstance(want, float) and not exact:
        assert got == pytest.approx(want, rel=rtol, abs=atol), where
    else:
        assert got == want, where


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _assert_same_report(got: str, want: str, atol: float):
    """The same text, numbers within printing rounding (4 significant digits) or `atol`."""
    assert NUMBER.split(got) == NUMBER.split(want), "the reports' text differs"
    for g, w in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
        assert float(g) == pytest.approx(float(w), rel=1e-3, abs=atol), (g, w)


def test_two_processes_write_what_one_process_writes(tmp_path, reference):
    """The tiny pipeline with its experts split over two `jax.distributed` processes
    (`--config.mesh.expert=2`) against the uninterrupted one-process run: the statistics agree
    to float32 rounding (their sums run in another order over two devices), every other
    artifact is equal array for array, the report is the same file up to the last digits,
    process 0 alone tells the progress, and a rerun of both processes reuses every stage."""
    one, two = reference[0], str(tmp_path / "two")
    runs = distributed([two, two], "--config.mesh.expert=2")
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"done: report at {two}/report.md" in r.stdout
    assert "stage convert     running" in runs[0].stderr
    assert "mode_jax.runner" not in runs[1].stderr  # info lines from process 0 only

    want, got = _artifacts(one), _artifacts(two)
    assert sorted(got) == sorted(want)
    for stage, fp in want:
        where = f"{stage}/{fp}"
        (w_arrays, w_meta), (g_arrays, g_meta) = [
            checkpoint.load(os.path.join(wd, stage, fp)) for wd in (one, two)]
        # the routing-weight sums and the sensitivity sums, and the ILP objective made of them,
        # move by float rounding (each device runs the vision tower on its half of a batch's
        # images; counts stay exact), and so do the models' logits (their experts split over
        # the two devices: a token's weighted expert outputs are summed in another order); a KL
        # of two near-equal distributions is a difference of near-equal numbers, so it moves by
        # ~1e-6 absolute, and a Hutchinson trace is a sum of products of either sign (measured:
        # 1.3e-5 relative on a trace of 0.108)
        exact = stage not in ("calibrate", "sensitivity", "evaluate")
        atol = 2e-6 if stage == "evaluate" else 0.0
        rtol = 1e-4 if stage == "sensitivity" else 1e-6
        _assert_close(checkpoint.flatten(g_arrays), checkpoint.flatten(w_arrays), where, exact,
                      atol, rtol)
        _assert_close(_untimed(g_meta), _untimed(w_meta), where, exact and stage != "allocate",
                      atol, rtol)
    with open(f"{one}/report.md") as f, open(f"{two}/report.md") as g:
        _assert_same_report(g.read(), f.read(), atol=2e-6)
    assert not [n for n in os.listdir(two) if n.startswith((".tmp-", ".shared-probe"))]

    again = distributed([two, two], "--config.mesh.expert=2")
    for r in again:
        assert r.returncode == 0, r.stderr[-3000:]
    assert again[0].stderr.count(" reused ") == 6 and " running " not in again[0].stderr
