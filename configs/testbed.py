"""The shipped testbed (checkpoints/testbed): the README's default job, on CPU.

  python main.py --config=configs/testbed.py --workdir=runs/testbed

runs MODE, every baseline and the uninformed control `random` on the same statistics (the
sweep) at 3 average bits. Further commands on the same workdir reuse the statistics and add
their rows to the same report (`bash benchmarks/testbed_table.sh` runs those of the README's
table):

  # 2 average bits, candidates 1/2/3; 2.4375 average bits, candidates 2/3/4 (no 1-bit expert)
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.alloc.budget_bits=2 --config.alloc.bits='(1,2,3)'
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.alloc.budget_bits=2.4375 \
      --config.sweep='("mode","pmq","gemq","mopeq-budget","random")'
  # other draws of the control; MoPEQ with the Hessian trace of method.md
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.alloc.random_seed=1 --config.sweep='("random",)'
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.sens.trace_curvature=hessian --config.sweep='("mopeq-budget",)'
  # MODE's frequency-key ablations (add the two flags above for 2 bits)
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.sweep='("mode/total","mode/text+all-image","mode/text+redundant")'
  # MODE with the exact logit_kl estimator; sensitivity measured on GPTQ copies of the experts
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.sens.estimator=logit_kl --config.sweep='("mode",)'
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.sens.quantizer=gptq --config.sweep='("mode","pmq","gemq")'
  # statistics on text-only prompts too (the reference sees image prompts only)
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.data.testbed_stats_tasks=all
  # uniform round-to-nearest instead of GPTQ; GEMQ's router fine-tuning on GPTQ
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.quant.method=rtn --config.sweep='("uniform",)'
  python main.py --config=configs/testbed.py --workdir=runs/testbed \
      --config.quant.router_finetune=True --config.sweep='("uniform","mode")'
"""

from configs import common


def get_config():
    c = common.get_config()
    c.model.path = f"{common.REPO_ROOT}/checkpoints/testbed"
    c.data.source = "testbed"
    c.data.num_freq_samples = 128
    c.data.num_sens_samples = 32
    # 64 conversations overfit GPTQ on the folded checkpoint (uniform 3 bits: KL 0.068, worse than
    # round-to-nearest's 0.030); 256 gives 0.020, 512 0.016, 1024 0.025 (docs/testbed.md)
    c.data.num_gptq_samples = 256
    c.data.batch_size = 16
    c.data.max_length = 256
    c.sens.hutchinson_probes = 32
    # MoPEQ's Hessian traces on random tokens are negative for 46 of 48 experts here (clipped to
    # 0: an allocation resting on nothing); the Gauss-Newton trace is PSD (docs/testbed.md)
    c.sens.trace_curvature = "gauss_newton"
    c.eval.num_samples = 200
    c.sweep = ("mode", "uniform", "pmq", "gemq", "mopeq-budget", "random")
    c.lock()
    return c
