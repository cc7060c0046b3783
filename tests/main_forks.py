"""Runs of main.py (or of a test script) forked from a process that has already imported what
they import.

Each fresh `python main.py` spends 3 to 5 s importing jax, flax and mode_jax before it reads
its flags, often longer than what a test looks at takes. `Forks` starts one server process that
imports those modules and nothing else (no JAX backend, no flags parsed); each run is a fork of
it that executes the script as `__main__` with the given argv, stdout and stderr in files, and
is reported as a subprocess would be (exit code, or minus the signal that ended it). The child
is a new process running the script from its first line: only the imports are done already.

`env` sets variables in the child before the script runs: fine for what is read when the JAX
backend starts (XLA_FLAGS, so a test may ask for host devices), not for what jax reads when it
is imported (JAX_PLATFORMS, JAX_COMPILATION_CACHE_DIR), which the server's environment fixes.
main.py started from scratch stays tested by the suite's other runs: test_pipeline_resume.py's
reference, Ctrl-C and two-process runs, test_pipeline_families.py, test_multihost.py.
"""

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER = r"""
import atexit, json, os, runpy, sys
from jax._src import xla_bridge
# what main.py imports after parsing its flags, and what stages.validate imports
import absl.app, ml_collections.config_flags
from mode_jax import multihost, preprocess, stages
from mode_jax.calib import passes, sources

assert not xla_bridge._backends, "a JAX backend started before forking"
sys.stdout.flush()
while line := sys.stdin.readline():
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            sys.argv = req["argv"]
            if sys.argv[0] == "-c":  # python -c CODE ARGS: sys.argv is ["-c", *ARGS]
                code_text, sys.argv = sys.argv[1], ["-c", *sys.argv[2:]]
                exec(compile(code_text, "<string>", "exec"), {"__name__": "__main__"})
            else:
                runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:  # the interpreter's exit, less waiting on threads: exit handlers, flushes
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Run:
    """One forked run in progress: its pid and the files its output goes to."""

    def __init__(self, forks, argv, pid, stdout, stderr):
        self._forks, self.argv, self.pid = forks, argv, pid
        self.stdout_path, self.stderr_path = stdout, stderr

    def stderr_lines(self, timeout: float = 300):
        """Lines of stderr as the run writes them, until it ends."""
        deadline, pos, pending = time.monotonic() + timeout, 0, ""
        while True:
            done = self._forks.finished()
            with open(self.stderr_path) as f:
                f.seek(pos)
                pending += f.read()
                pos = f.tell()
            *lines, pending = pending.split("\n")
            yield from (line + "\n" for line in lines)
            if done:
                if pending:
                    yield pending
                return
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            time.sleep(0.02)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        code = self._forks.reply(timeout)["returncode"]
        with open(self.stdout_path) as o, open(self.stderr_path) as e:
            return subprocess.CompletedProcess([sys.executable, *self.argv], code, o.read(),
                                               e.read())


class Forks:
    """One server; `run(argv)` / `start(argv)` fork it for each run, one run at a time."""

    def __init__(self, env: dict | None = None):
        """env: the server's environment on top of this process's (JAX_PLATFORMS=cpu...)."""
        self._dir = tempfile.TemporaryDirectory(prefix="main_forks_")  # the runs' output
        env = dict(os.environ, **(env or {}))
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._count = 0
        self._replies = b""  # read from the server, not yet taken
        self._running: Run | None = None

    def start(self, argv: list[str], env: dict | None = None) -> Run:
        """Fork a run of `argv` (`["main.py", ...]` or `["-c", code]`), from the repo root."""
        self._count += 1
        out, err = (os.path.join(self._dir.name, f"{self._count}.{s}") for s in ("out", "err"))
        for path in (out, err):  # there before the run writes, for stderr_lines to read
            open(path, "w").close()
        req = {"argv": argv, "cwd": REPO, "stdout": out, "stderr": err, "env": env or {}}
        self._proc.stdin.write(json.dumps(req).encode() + b"\n")
        self._proc.stdin.flush()
        self._running = Run(self, argv, self.reply(60)["pid"], out, err)
        return self._running

    def run(self, argv: list[str], env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Like `subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True)`."""
        return self.start(argv, env).wait(timeout)

    def finished(self) -> bool:
        """Whether the current run has ended (its exit reply has come)."""
        return self._receive(0)

    def reply(self, timeout: float) -> dict:
        """The server's next reply (a pid, then an exit code, per run)."""
        if not self._receive(timeout):
            self.close()
            raise subprocess.TimeoutExpired("forked run", timeout)
        line, self._replies = self._replies.split(b"\n", 1)
        reply = json.loads(line)
        if "returncode" in reply:
            self._running = None
        return reply

    def _receive(self, timeout: float) -> bool:
        """Read what the server wrote until a whole reply is here or `timeout` passes."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._replies:
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    return False
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server stopped (exit {self._proc.wait()})")
            self._replies += chunk
        return True

    def __enter__(self) -> "Forks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server, and a run still going."""
        if self._running is not None:
            try:
                self._running.kill()
            except ProcessLookupError:
                pass
        self._proc.kill()
        self._proc.wait()
        self._dir.cleanup()
