"""Tiny config for tests and the smoke run: the kimivl-tiny fixture, a few samples, small groups.

python main.py --config=configs/tiny.py --workdir=/tmp/mode_tiny
"""

from configs import common


def get_config():
    c = common.get_config()
    c.model.path = f"{common.REPO_ROOT}/tests/fixtures/kimivl-tiny"
    c.data.source = "random"  # the fixture ships no tokenizer
    c.data.num_freq_samples = 8
    c.data.num_sens_samples = 4
    c.data.num_gptq_samples = 4
    c.data.batch_size = 4
    c.data.max_length = 128
    c.sens.group_size = 32
    c.sens.hutchinson_probes = 8
    c.quant.group_size = 32
    c.quant.block_size = 32
    c.eval.num_samples = 8
    c.lock()
    return c
