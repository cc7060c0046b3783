"""The shipped testbed (checkpoints/testbed): the README's default job, on CPU.

  python main.py --config=configs/testbed.py --workdir=runs/testbed
  python main.py --config=configs/testbed.py --workdir=runs/testbed --config.alloc.budget_bits=2 \
      --config.alloc.bits='(1,2,3)'

Runs MODE and every baseline on the same statistics (the sweep) at 3 average bits; a second
command at 2 bits adds its rows to the same report.
"""

from configs import common


def get_config():
    c = common.get_config()
    c.model.path = f"{common.REPO_ROOT}/checkpoints/testbed"
    c.data.source = "testbed"
    c.data.num_freq_samples = 128
    c.data.num_sens_samples = 32
    c.data.num_gptq_samples = 64
    c.data.batch_size = 16
    c.data.max_length = 256
    c.sens.hutchinson_probes = 32
    c.eval.num_samples = 200
    c.sweep = ("mode", "uniform", "pmq", "gemq", "mopeq-budget")
    c.lock()
    return c
