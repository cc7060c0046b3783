"""What a run does differently when several processes share it (`jax.distributed`).

Every process runs every stage (the jitted passes are one SPMD program over the global mesh) and
gets the same results; the workdir lies on a filesystem all of them share. Process 0 alone
writes artifacts, reports and figures, and the others wait at a barrier until it has, so no two
processes ever write one file. With a single process nothing here waits or communicates.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import jax
import numpy as np


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1):
    """`jax.distributed.initialize`, with the cluster's own detection (TPU pods, Slurm, Open MPI)
    for whatever is left unset; on a plain set of GPU hosts all three must be given."""
    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (the names must match in order)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def from_primary(value):
    """Process 0's `value` (a bool or number) on every process. What decides the program must
    not differ between processes: whether an artifact is complete (process 0 may be writing
    it), a device's free memory."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value))).item()


def from_primary_text(text: str) -> str:
    """Process 0's ASCII `text` on every process; the others pass any text of the same length
    (a digest, a token) as a placeholder."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    mine = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).decode("ascii")


def to_host(value):
    """A numpy copy of `value` whether or not this process holds all of it (a global array split
    over hosts is gathered: every process must call this together)."""
    if (not isinstance(value, jax.Array) or value.is_fully_addressable
            or value.sharding.is_fully_replicated):
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def tree_to_host(tree):
    """`to_host` over a pytree (dicts of arrays, as stages return them) where several processes
    share the run; a single process keeps its arrays where they are."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(to_host, tree)


def processes_disagreeing(tree: dict) -> list[int]:
    """The processes whose host arrays in `tree` differ from process 0's (the same list on every
    process). Process 0 alone saves a stage's result while each process goes on with its own,
    so a stage that is not the same computation everywhere (another package version on one
    host) would otherwise diverge silently."""
    if jax.process_count() == 1:
        return []
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)} {a.shape} {a.dtype}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    mine = np.frombuffer(h.digest(), dtype=np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    return [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]


def processes_not_sharing(workdir: str) -> list[int]:
    """The processes that cannot read a file process 0 writes in `workdir` (the same list on
    every process, so all of them fail alike): artifacts are written once, by process 0, and
    read by all."""
    if jax.process_count() == 1:
        return []
    from jax.experimental import multihost_utils

    token = from_primary_text(uuid.uuid4().hex)
    probe = os.path.join(workdir, f".shared-probe-{token}")
    if is_primary():
        with open(probe, "w") as f:
            f.write(token)
    barrier("shared workdir probe written")
    try:
        with open(probe) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    everyone = multihost_utils.process_allgather(np.asarray(seen))
    barrier("shared workdir probe read")
    if is_primary():
        os.remove(probe)
    return [i for i, ok in enumerate(np.asarray(everyone).reshape(-1)) if not ok]
