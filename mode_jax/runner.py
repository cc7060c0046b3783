"""Resumable stage runner: each stage's artifact lives at `<workdir>/<stage>/<fingerprint>/`.

A stage's fingerprint hashes the config fields it declares, the content digests of the files
named by its `content_keys` (`mode_jax.content_digest`: the checkpoint and data files are keyed
by what they hold, not where they lie), plus its inputs' fingerprints, so
- rerunning the same command skips every stage whose artifact is complete;
- changing one field, or the bytes of a file it reads, reruns only the stages downstream of it
  (their fingerprints change);
- several methods of a sweep share the statistics stages (same fingerprints);
- an artifact is never reused under a different config: its recorded config must equal the
  current one, or the run stops with a message naming the differing fields.
Artifacts are written atomically (mode_jax.checkpoint), so a killed run leaves no partial one.
In a multi-process run every process runs each stage, and process 0 alone writes its artifact
while the others wait (mode_jax.multihost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from mode_jax import checkpoint, content_digest, multihost

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when an artifact's layout changes, so old ones are not reused


class UserError(Exception):
    """A problem with the user's input or environment: reported in one line, exit code 2."""


@dataclasses.dataclass
class Artifact:
    arrays: dict
    meta: dict
    path: str


@dataclasses.dataclass(frozen=True)
class Stage:
    """`run(ctx, inputs) -> (arrays, meta)`; `config_keys` are dotted config paths."""

    name: str
    inputs: tuple[str, ...]
    config_keys: tuple[str, ...]
    run: Callable[[Context, dict[str, Artifact]], tuple[dict, dict]]
    layout: str = ""  # the stored layout, where it changes apart from FORMAT_VERSION
    content_keys: tuple[str, ...] = ()  # dotted config paths of files whose bytes it reads


def config_value(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in sorted(value.items())}
    return value


class Context:
    """What a stage sees: the config, the workdir, and a cache of loaded artifacts."""

    def __init__(self, config: Any, workdir: str, stages: dict[str, Stage]):
        self.config = config
        self.workdir = workdir
        self.stages = stages
        self._fingerprints: dict[str, str] = {}
        self._digests: dict[str, str] = {}
        self._loaded: dict[str, Artifact] = {}
        self.cache: dict[str, Any] = {}  # objects stages share within one process (models)
        self.log: list[str] = []  # what each stage did, for the report

    def recorded_config(self, name: str) -> dict:
        stage = self.stages[name]
        own = {k: _jsonable(config_value(self.config, k)) for k in stage.config_keys}
        ups = {i: self.fingerprint(i) for i in stage.inputs}
        recorded = {"format": FORMAT_VERSION, "stage": name, "config": own, "inputs": ups}
        if stage.layout:  # only where set, so the other stages keep their fingerprints
            recorded["layout"] = stage.layout
        if stage.content_keys:
            recorded["content"] = {k: self.content_digest(config_value(self.config, k))
                                   for k in stage.content_keys}
        return recorded

    def content_digest(self, path: str) -> str:
        """The digest of the file or directory ``path`` ("" for an unset path), computed once
        per run, by process 0 alone in a multi-process run (the others would read the same
        shared files again); per-file hashes are cached under the workdir, one file per host."""
        if not path:
            return ""
        if path not in self._digests:
            found = "0" * content_digest.DIGEST_CHARS  # the others' placeholder
            if multihost.is_primary():
                cache = os.path.join(self.workdir, ".content_digests",
                                     f"{socket.gethostname()}.json")
                try:
                    found = content_digest.digest(path, cache)
                except OSError as e:
                    raise UserError(f"cannot read {path} to fingerprint it: {e}") from e
            self._digests[path] = multihost.from_primary_text(found)
        return self._digests[path]

    def fingerprint(self, name: str) -> str:
        if name not in self._fingerprints:
            doc = json.dumps(self.recorded_config(name), sort_keys=True)
            self._fingerprints[name] = hashlib.sha256(doc.encode()).hexdigest()[:16]
        return self._fingerprints[name]

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name, self.fingerprint(name))

    def ensure(self, name: str) -> Artifact:
        """Load the stage's artifact, running it (and what it needs) first if absent."""
        if name in self._loaded:
            return self._loaded[name]
        stage = self.stages[name]
        path = self.path(name)
        if multihost.from_primary(checkpoint.is_complete(path)):
            arrays, meta = _load(path)
            self._check_recorded(name, meta)
            log.info("stage %-11s reused %s", name, path)
        else:
            inputs = {i: self.ensure(i) for i in stage.inputs}
            if multihost.is_primary():  # the others' .tmp-* would be process 0's, mid-write
                checkpoint.remove_stale_tmp(os.path.dirname(path))
            log.info("stage %-11s running -> %s", name, path)
            start = time.time()
            arrays, meta = stage.run(self, inputs)
            arrays = multihost.tree_to_host(arrays)  # all processes: may gather across hosts
            differ = multihost.processes_disagreeing(arrays)
            if differ:
                raise UserError(
                    f"stage {name}: process(es) {differ} computed other arrays than process 0; "
                    "every host needs the same packages (pip freeze) and the same input files")
            meta = {**meta, "recorded_config": self.recorded_config(name),
                    "seconds": round(time.time() - start, 3)}
            if multihost.is_primary():
                checkpoint.save(path, arrays, meta)
            multihost.barrier(f"saved {path}")
            self.log.append(f"{name}: ran in {meta['seconds']:.1f} s")
        self._loaded[name] = Artifact(arrays, meta, path)
        return self._loaded[name]

    def _check_recorded(self, name: str, meta: dict) -> None:
        want = self.recorded_config(name)
        got = meta.get("recorded_config")
        if got != want:
            diff = sorted(
                k for k in set(want["config"]) | set((got or {}).get("config", {}))
                if want["config"].get(k) != (got or {}).get("config", {}).get(k)
            )
            raise UserError(
                f"artifact {self.path(name)} was made with a different config "
                f"(fields: {', '.join(diff) or 'format/inputs'}); refusing to reuse it. "
                "Remove it or use another --workdir."
            )


def _load(path: str) -> tuple[dict, dict]:
    """A complete artifact, or a UserError saying which one cannot be read and what to do.

    Artifacts are written atomically, so this is damage from outside the run (a disk, a copy,
    a hand edit); recomputing is the user's call, not removed here."""
    try:
        with _stderr_held():
            return checkpoint.load(path)
    except Exception as e:  # orbax/tensorstore, json and OS errors alike: the file is the cause
        first = " ".join(str(e).split())[:300]
        raise UserError(f"artifact {path} is unreadable ({type(e).__name__}: {first}); "
                        f"remove it (rm -r {path}) and rerun to recompute it") from None


@contextlib.contextmanager
def _stderr_held(settle_seconds: float = 1.0):
    """Hold what is written to file descriptor 2 while an artifact loads; pass it on if the load
    succeeds. When an Orbax restore fails, the reads still in flight call back into its closed
    asyncio loop from tensorstore's threads, each printing a traceback; those are dropped
    (after `settle_seconds` for the reads to finish), so the UserError is what the user sees."""
    sys.stderr.flush()
    held, saved = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(held.fileno(), 2)
    ok = False
    try:
        yield
        ok = True
    finally:
        if not ok:
            time.sleep(settle_seconds)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if ok:
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
        held.close()


def check_workdir(workdir: str) -> None:
    """Fail early, before any stage writes, if the workdir cannot be written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir!r} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-probe-{uuid.uuid4().hex}")  # hosts share pids
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e
    missing = multihost.processes_not_sharing(workdir)
    if missing:
        raise UserError(f"workdir {workdir!r} is not shared by all hosts: process(es) {missing} "
                        "cannot read what process 0 writes there; give every process the same "
                        "shared directory (NFS, a mounted bucket)")
