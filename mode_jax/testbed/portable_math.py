"""XLA:CPU settings under which the testbed's training arithmetic does not depend on the x86 CPU.

By default XLA's CPU backend hands matrix products to YNNPACK, which picks its kernels by the
instruction set it finds at run time (AVX2, AVX-512, AVX-512 FP16, ...), and its own generated
code targets the host CPU too. Two machine kinds then sum in different orders, and the testbed
recipe, whose colour look-up is learned in one sensitive phase, ends points apart (the shipped
recipe rerun on an AVX-512 FP16 machine lagged by 9 probe points; docs/testbed.md). With these
flags the products stay in XLA's own code and that code is capped at AVX2, so an x86-64 machine
with AVX2 computes the same bits as another, for the same number of cores (the thread count
moves the last bits too). XLA reads them once, when JAX starts its CPU backend, so they must be
set before any array is made: `enable` sets them or says why it cannot.
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping

X86 = ("x86_64", "amd64", "i386", "i686")


def flags(machine: str | None = None) -> tuple[str, ...]:
    """The XLA flags: YNNPACK off everywhere; generated code capped at AVX2 on x86 only (the
    cap names an x86 instruction set)."""
    machine = (machine or platform.machine()).lower()
    return (("--xla_cpu_experimental_ynn_fusion_type=",)
            + (("--xla_cpu_max_isa=AVX2",) if machine in X86 else ()))


def in_effect(env: MutableMapping[str, str] = os.environ) -> bool:
    """Whether XLA_FLAGS in `env` holds every portable flag."""
    given = env.get("XLA_FLAGS", "").split()
    return all(f in given for f in flags())


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public way to ask; tested in tests/test_train.py
    return xla_bridge.backends_are_initialized()


def enable(env: MutableMapping[str, str] = os.environ, started=_backend_started) -> None:
    """Add the portable flags to XLA_FLAGS (keeping the user's own); a clear error if JAX's
    backend already started without them, since XLA would silently ignore them then."""
    if in_effect(env):
        return
    if started():
        raise RuntimeError(
            "portable_math needs XLA_FLAGS to hold " + " ".join(flags()) + " before JAX starts "
            "its CPU backend, and it has already started in this process: run "
            "`python -m mode_jax.testbed.train ...` (it sets them first), or set XLA_FLAGS "
            "yourself before the first JAX computation")
    given = env.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags()}
    kept = [f for f in given if f.split("=")[0] not in names]  # ours win over a conflicting one
    env["XLA_FLAGS"] = " ".join([*kept, *flags()])


def describe(env: MutableMapping[str, str] = os.environ) -> dict:
    """What the run's arithmetic depended on, for train_summary.json."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if "model name" in line), "")
    return {"portable_math": in_effect(env), "xla_flags": env.get("XLA_FLAGS", ""),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "machine": platform.machine(), "cpu": cpu}


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []
