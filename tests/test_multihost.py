"""Multi-process runs (`jax.distributed`), as CPU processes on this machine, one device each.

The reference is the same pipeline in one process on one device. (One process with two forced
CPU devices would run the same SPMD programs, but XLA:CPU sometimes deadlocks there in
`gptq_quantize_experts` on an expert-split stack, which separate processes do not.)
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mode_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _start(argv_per_process: list[list[str]], timeout: int) -> list[subprocess.CompletedProcess]:
    """Start one process per argv together (they wait for each other), collect all of them."""
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in argv_per_process]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    return out


SNIPPET = """
import sys, json
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from mode_jax import multihost, sharding
me, shared = int(sys.argv[1]), sys.argv[3]
multihost.initialize(sys.argv[2], 2, me)
mesh = sharding.make_mesh(expert=2)
x = np.arange(12.0).reshape(4, 3)
split = jax.device_put(x, NamedSharding(mesh, PartitionSpec("expert")))
res = {
    "primary": multihost.is_primary(),
    "split_is_local": split.is_fully_addressable,
    "gathered": multihost.to_host(split).tolist(),
    "tree": {k: v.tolist() for k, v in multihost.tree_to_host({"a": split * 2}).items()},
    "from_primary": multihost.from_primary(10 + me),
    "agree": multihost.processes_disagreeing({"a": x, "b": {"c": np.ones(2, np.uint8)}}),
    "disagree": multihost.processes_disagreeing({"a": x + (me == 1)}),
    "shared": multihost.processes_not_sharing(shared),
    "own_dirs": multihost.processes_not_sharing(f"{shared}/{me}"),
}
multihost.barrier("end")
print("RESULT " + json.dumps(res))
"""


def test_multihost_helpers_across_two_processes(tmp_path):
    """Gathering a split array, process 0's decisions, the cross-process agreement check and
    the shared-workdir probe, each against what the two processes really hold."""
    script = tmp_path / "snippet.py"
    script.write_text(textwrap.dedent(SNIPPET))
    for me in (0, 1):
        (tmp_path / str(me)).mkdir()
    addr = f"localhost:{_free_port()}"
    runs = _start([[str(script), str(me), addr, str(tmp_path)] for me in (0, 1)], timeout=240)
    results = []
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    x = np.arange(12.0).reshape(4, 3)
    for me, res in enumerate(results):
        assert res["primary"] == (me == 0)
        assert res["split_is_local"] is False  # half of it lies on the other process
        assert res["gathered"] == x.tolist()
        assert res["tree"] == {"a": (2 * x).tolist()}
        assert res["from_primary"] == 10
        assert res["agree"] == []
        assert res["disagree"] == [1]
        assert res["shared"] == []
        assert res["own_dirs"] == [1]  # process 1 looks in a directory process 0 never wrote
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".shared-probe")]


def _main(workdir, *flags):
    return ["main.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]


def _distributed(workdirs, *flags, timeout=600):
    addr = f"--coordinator_address=localhost:{_free_port()}"
    return _start([_main(wd, "--distributed", addr, "--num_processes=2", f"--process_id={i}",
                         *flags) for i, wd in enumerate(workdirs)], timeout=timeout)


def _artifacts(workdir) -> dict:
    """{stage/fingerprint: (flat arrays, meta without timings)} of every stage artifact."""
    out = {}
    for stage in ("convert", "calibrate", "sensitivity", "allocate", "quantize", "evaluate"):
        for fp in os.listdir(os.path.join(workdir, stage)):
            arrays, meta = checkpoint.load(os.path.join(workdir, stage, fp))
            out[f"{stage}/{fp}"] = (checkpoint.flatten(arrays), _untimed(meta))
    return out


def _untimed(meta):
    """Meta without wall-clock figures, which no two runs share."""
    if isinstance(meta, dict):
        return {k: _untimed(v) for k, v in meta.items()
                if k not in ("seconds", "solve_time_s")}
    return meta


def _assert_close(got, want, where: str, exact: bool):
    """Integers and strings equal; floats equal, or within float32 rounding where not `exact`."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}/{k}", exact)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]", exact)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        if exact or not np.issubdtype(want.dtype, np.floating):
            assert np.array_equal(got, want, equal_nan=True), where
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=where)
    elif isinstance(want, float) and not exact:
        assert got == pytest.approx(want, rel=1e-6), where
    else:
        assert got == want, where


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path):
    """The tiny pipeline with its experts split over two processes (`--config.mesh.expert=2`)
    against one process on one device: the statistics agree to float32 rounding (the sums run
    in another order over two devices: 2e-8 relative, measured), every other artifact is equal
    array for array, the report is the same file, process 0 alone tells the progress, and a
    rerun of both processes reuses every stage."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = subprocess.run([sys.executable, *_main(one)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    runs = _distributed([two, two], "--config.mesh.expert=2")
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"done: report at {two}/report.md" in r.stdout
    assert "stage convert     running" in runs[0].stderr
    assert "mode_jax.runner" not in runs[1].stderr  # info lines from process 0 only

    want, got = _artifacts(one), _artifacts(two)
    assert sorted(got) == sorted(want)
    for key in want:
        # the sensitivity sums, and the ILP objective made of them, move by float rounding
        exact = not key.startswith("sensitivity/")
        _assert_close(got[key][0], want[key][0], key, exact)
        _assert_close(got[key][1], want[key][1], key, exact and not key.startswith("allocate/"))
    with open(f"{one}/report.md") as f, open(f"{two}/report.md") as g:
        assert g.read() == f.read()
    assert not [n for n in os.listdir(two) if n.startswith((".tmp-", ".shared-probe"))]

    again = _distributed([two, two], "--config.mesh.expert=2")
    for r in again:
        assert r.returncode == 0, r.stderr[-3000:]
    assert again[0].stderr.count(" reused ") == 6 and " running " not in again[0].stderr


def test_processes_with_different_workdirs_stop_with_one_line(tmp_path):
    """Artifacts are written by process 0 and read by all: a workdir that is not shared is
    named on every process before any stage runs."""
    runs = _distributed([str(tmp_path / "a"), str(tmp_path / "b")], timeout=300)
    for r in runs:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert "is not shared by all hosts: process(es) [1]" in r.stderr
    assert os.listdir(tmp_path / "a") == [] and os.listdir(tmp_path / "b") == []
