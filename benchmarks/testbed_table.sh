#!/usr/bin/env bash
# Every run behind the README's method table ("What it says about the methods"), on the shipped
# testbed: three budgets, each with MODE, the baselines, five draws of the random control, MoPEQ
# with method.md's Hessian trace and MODE with the exact logit_kl estimator on statistics of all
# tasks. One workdir: every run reuses the statistics stages it shares with an earlier one and
# adds its rows to <workdir>/report.md, where the table is read. 47 minutes on 2 cores with a few
# small jobs beside it (2026-12-06, the shipped checkpoint); 91 beside a training run.
#   bash benchmarks/testbed_table.sh [workdir, default runs/table]
# shellcheck disable=SC2086  # a budget's flags are split into words on purpose
set -eu
WORKDIR=${1:-runs/table}
run() { python main.py --config=configs/testbed.py --workdir="$WORKDIR" "$@"; }
budget() {  # flags of the budget, sweep of its first run
  local flags=$1 sweep=$2
  run $flags --config.sweep="$sweep"
  for seed in 1 2 3 4; do
    run $flags --config.alloc.random_seed=$seed --config.sweep='("random",)'
  done
  run $flags --config.sens.trace_curvature=hessian \
    --config.sweep='("mopeq-budget",)'
  run $flags --config.sens.estimator=logit_kl \
    --config.data.testbed_stats_tasks=all --config.sweep='("mode",)'
}
budget "" '("mode","uniform","pmq","gemq","mopeq-budget","random")'
budget "--config.alloc.budget_bits=2.4375" \
  '("mode","pmq","gemq","mopeq-budget","mopeq","random")'
budget "--config.alloc.budget_bits=2 --config.alloc.bits=(1,2,3)" \
  '("mode","uniform","pmq","gemq","mopeq-budget","random")'
