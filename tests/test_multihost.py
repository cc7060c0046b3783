"""Multi-process helpers (`jax.distributed`), as CPU processes on this machine, one device each.

The whole pipeline over two processes is checked against one process in test_pipeline_resume.py,
beside the uninterrupted run it shares.
"""

import json
import os
import textwrap

import numpy as np
import pytest
from multiprocess_runs import distributed, free_port, start

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
    addr = f"localhost:{free_port()}"
    runs = start([[str(script), str(me), addr, str(tmp_path)] for me in (0, 1)], timeout=240)
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


def test_processes_with_different_workdirs_stop_with_one_line(tmp_path):
    """Artifacts are written by process 0 and read by all: a workdir that is not shared is
    named on every process before any stage runs."""
    runs = distributed([str(tmp_path / "a"), str(tmp_path / "b")], timeout=300)
    for r in runs:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert "is not shared by all hosts: process(es) [1]" in r.stderr
    assert os.listdir(tmp_path / "a") == [] and os.listdir(tmp_path / "b") == []


DATA_SNIPPET = """
import sys
import jax, numpy as np
from jax.sharding import PartitionSpec
import mode_jax
from mode_jax import multihost, sharding
from mode_jax.calib import passes, sources
from mode_jax.eval import generate
multihost.initialize(sys.argv[2], 2, int(sys.argv[1]))
model = mode_jax.load("tests/fixtures/kimivl-tiny")
cfg = model.config
batches = sources.random_batches(cfg, n=4, batch_size=2, seed=0)
scfg = passes.StatsConfig(image_token_id=cfg.media_placeholder_token_id, special_token_ids=(1,))

def run(m):
    cache = passes.collect_tokens(m, batches, scfg)
    return (passes.frequency_pass(m, batches, scfg), cache,
            passes.logit_kl_pass(m, batches[:1], scfg, (1, 2), 32),
            m(batches[0]).logits, generate.greedy_generate(m, batches[0], 3, 0).tokens,
            passes.token_costs(m, cache, (2, 4), 32))  # the experts split in two

want = run(model)  # this process's own device, nothing shared
sharding.shard_model(model, sharding.make_mesh(expert=1))  # data = 2: one row per process
dev, _ = passes.device_batch(model, batches[0])
assert dev["input_ids"].sharding.spec == PartitionSpec("data")
assert not dev["input_ids"].is_fully_addressable  # the other row lies on the other process
got = run(model)
for k, v in want[0].items():
    np.testing.assert_allclose(got[0][k], v, rtol=1e-6, err_msg=k)
for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
for k, v in want[2].items():
    np.testing.assert_allclose(got[2][k], v, rtol=1e-3, atol=1e-6, err_msg=k)
np.testing.assert_allclose(got[3], want[3], rtol=1e-5, atol=1e-5)  # both halves, on each
np.testing.assert_array_equal(got[4], want[4])
for k, v in want[5].items():
    np.testing.assert_allclose(got[5][k], v, rtol=1e-4, atol=1e-9, err_msg=k)
multihost.barrier("end")
print("DATA_OK")
"""


@pytest.mark.slow
def test_batches_split_over_two_processes_give_the_one_process_statistics(tmp_path):
    """On a mesh whose "data" axis spans the two processes, each process holds half of every
    batch: the frequency counts, the token cache (its per-token rows gathered from both
    processes), logit_kl, the model's logits and greedy tokens (gathered), and the token-level
    estimators (each chunk's experts split between the processes) equal what each process
    computes alone. (GPTQ's walk on split batches, which gathers nothing, is checked on
    4 host devices in test_sharding.py.)"""
    script = tmp_path / "data_snippet.py"
    script.write_text(textwrap.dedent(DATA_SNIPPET))
    addr = f"localhost:{free_port()}"
    for r in start([[str(script), str(me), addr] for me in (0, 1)], timeout=400):
        assert r.returncode == 0 and "DATA_OK" in r.stdout, r.stderr[-3000:]
