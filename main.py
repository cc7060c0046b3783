"""mode-jax: compress a MoE multimodal LLM with expert-level mixed-precision PTQ.

  python main.py --config=configs/testbed.py --workdir=runs/testbed
  python main.py --config=configs/kimivl.py --config.model.path=/data/Kimi-VL-A3B-Instruct \
      --config.data.calib_json=/data/sharegpt4v.json --config.data.image_dir=/data/coco \
      --config.alloc.budget_bits=2.5 --workdir=runs/kimivl

Every stage writes its artifact under --workdir; rerunning the same command resumes after the
last completed stage. Bad input ends with one line on stderr and exit code 2.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where stage artifacts are written.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU jobs); "
    "TPU pods, Slurm and Open MPI are detected, other clusters give the three flags below."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "With --distributed: host:port of process 0, the same everywhere.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "With --distributed: how many processes the job has.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "With --distributed: this process's index, 0 .. num_processes - 1.")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (settings are --config.<field>=<value>)",
              file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    handler = pylogging.StreamHandler()
    handler.setFormatter(pylogging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    ours = pylogging.getLogger("mode_jax")
    ours.setLevel(pylogging.INFO)
    ours.addHandler(handler)
    ours.propagate = False
    from mode_jax import multihost, stages  # after flag parsing: keeps --help fast

    if _DISTRIBUTED.value:
        try:
            multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        except (RuntimeError, ValueError) as e:  # no cluster detected, a bad address, a timeout
            message = " ".join(str(e).split())[:400]
            print(f"error: cannot start the distributed job: {message}", file=sys.stderr)
            _exit_now(2)
        if not multihost.is_primary():  # process 0 tells the progress; all report problems
            ours.setLevel(pylogging.WARNING)
    elif _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value >= 0:
        print("error: --coordinator_address, --num_processes and --process_id need --distributed",
              file=sys.stderr)
        sys.exit(2)
    try:
        out = stages.run(_CONFIG.value, _WORKDIR.value)
    except stages.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        _exit_now(2)
    except KeyboardInterrupt:
        print("interrupted: completed stages are kept; rerun the same command to resume",
              file=sys.stderr)
        _exit_now(130)  # XLA's threads may still be compiling: a normal shutdown can segfault
    final = _CONFIG.value.final_stage
    print(f"done: report at {out}" if final in stages.REPORTED_STAGES
          else f"done: {final} artifact at {out}")


def _exit_now(code: int) -> None:
    """Exit without the interpreter's shutdown: after a failed Orbax restore, tensorstore's
    threads still call back into the closed asyncio loop and would print tracebacks under the
    one-line error, and after Ctrl-C in a stage the teardown could segfault (exit -11 instead of
    130). Nothing is left to save (artifacts are written atomically)."""
    pylogging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_flags(argv):
    """absl's parser exits 1 with the usage text; a bad flag or config field is a user error (2)."""
    try:
        argv = flags.FLAGS(argv)
        config = _CONFIG.value
        if not hasattr(config, "to_dict"):  # ml_collections defers a bad file to an error object
            raise ValueError(f"cannot load config file {flags.FLAGS['config'].config_filename!r}")
        return argv
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError,
            NameError, ImportError) as e:  # the config file is Python: its errors are the user's
        message = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
        print(f"error: bad flag or config: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
