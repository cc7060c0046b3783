"""Starting main.py (or a script) as several `jax.distributed` CPU processes on this machine."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env() -> dict:
    """One CPU device per process and the repo importable; the suite's other XLA flags and
    compilation cache (conftest.py) stay, as for its other runs of main.py."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=1"]))


def start(argv_per_process: list[list[str]], timeout: int) -> list[subprocess.CompletedProcess]:
    """Start one process per argv together (they wait for each other), collect all of them."""
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env(), text=True,
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


def main_argv(workdir, *flags) -> list[str]:
    return ["main.py", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]


def distributed(workdirs, *flags, timeout=600) -> list[subprocess.CompletedProcess]:
    """main.py on the tiny config as len(workdirs) processes of one job, process i in
    workdirs[i]."""
    addr = f"--coordinator_address=localhost:{free_port()}"
    n = len(workdirs)
    return start([main_argv(wd, "--distributed", addr, f"--num_processes={n}",
                            f"--process_id={i}", *flags) for i, wd in enumerate(workdirs)],
                 timeout=timeout)
