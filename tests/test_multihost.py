"""Multi-process runs (`jax.distributed`), as CPU processes on this machine, one device each.

The reference is one process with as many devices: the same SPMD programs over the same mesh,
so a run split over processes must write exactly its artifacts and report.
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


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
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


@pytest.mark.slow
def test_two_processes_write_what_one_process_with_two_devices_writes(tmp_path):
    """The tiny pipeline with its experts split over two processes (`--config.mesh.expert=2`):
    every artifact equals the one-process, two-device run's array for array, the report is
    the same file, process 0 alone tells the progress, and a rerun of both processes reuses
    every stage."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = subprocess.run([sys.executable, *_main(one, "--config.mesh.expert=2")], cwd=REPO,
                         env=_env(devices=2), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    runs = _distributed([two, two], "--config.mesh.expert=2")
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"done: report at {two}/report.md" in r.stdout
    assert "stage convert     running" in runs[0].stderr
    assert "mode_jax.runner" not in runs[1].stderr  # info lines from process 0 only

    want, got = _artifacts(one), _artifacts(two)
    assert sorted(got) == sorted(want)
    for key, (arrays, meta) in want.items():
        g_arrays, g_meta = got[key]
        assert sorted(g_arrays) == sorted(arrays), key
        for name, a in arrays.items():
            assert g_arrays[name].dtype == a.dtype and np.array_equal(g_arrays[name], a), \
                f"{key}: {name}"
        assert g_meta == meta, key
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
