"""`python main.py ...` runs for tests that check how main.py refuses bad input, forked from a
process that has already imported what main.py imports.

Each such run spends about 3 s importing jax, flax and mode_jax before it reads its flags, and
well under one second doing what the test looks at. `Forks` starts one server process that
imports those modules and nothing else (no JAX backend, no flags parsed); each run is a fork of
it that executes main.py as `__main__` with the given argv, its stdout and stderr in files,
and its exit code reported as a subprocess's would be. The child is a new process running
main.py from its first line: only the imports are done already. Runs that change the
environment (which jax reads when it is imported) use a real subprocess instead, as do the
suite's pipeline tests, which start main.py from scratch.
"""

import json
import os
import selectors
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER = r"""
import json, os, runpy, sys
from jax._src import xla_bridge
import main_imports  # noqa: F401

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
            sys.argv = req["argv"]
            runpy.run_path(req["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""

# What main.py imports after parsing its flags, and what stages.validate imports.
_IMPORTS = """
import absl.app, ml_collections.config_flags  # noqa: F401
from mode_jax import multihost, preprocess, stages  # noqa: F401
from mode_jax.calib import passes, sources  # noqa: F401
"""


class Forks:
    """One server; `run(argv)` forks it for each run of main.py."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="main_forks_")
        with open(os.path.join(self._dir.name, "main_imports.py"), "w") as f:
            f.write(_IMPORTS)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([self._dir.name, REPO]))
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._count = 0

    def run(self, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """Like `subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True)`."""
        self._count += 1
        out, err = (os.path.join(self._dir.name, f"{self._count}.{s}") for s in ("out", "err"))
        req = {"argv": argv, "cwd": REPO, "stdout": out, "stderr": err}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.close()
                raise subprocess.TimeoutExpired(argv, timeout)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the main.py fork server stopped (exit {self._proc.wait()})")
        code = json.loads(line)["returncode"]
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess([sys.executable, *argv], code, o.read(), e.read())

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._dir.cleanup()
