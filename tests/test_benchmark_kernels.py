"""benchmarks/kernels.py end to end in Pallas interpret mode: every path the GPU run takes (the
kernels in two dequant modes, the bf16 kernel baseline, dequantize-then-bf16, one launch over
bit groups against one per group) runs here, so a scarce GPU session does not find a broken
script. The figures are not timings; the errors against the XLA path are checked."""

import re

import pytest

from benchmarks import kernels

pytestmark = pytest.mark.slow


def test_kernels_benchmark_runs_every_path_in_interpret_mode(capsys):
    kernels.run(kernels.parse_args([
        "--small", "--interpret", "--bits", "3", "--tokens", "2", "--mixed", "2+4",
        "--dequant", "magic,registers", "--repeats", "1", "--queued", "1",
    ]))
    out = capsys.readouterr().out
    assert "backend: triton" in out and "interpret mode" in out
    assert "failed" not in out
    for op in ("gate_up", "down"):
        rows = re.findall(rf"^{op} +3 +(magic|registers) +2 +16 .*$", out, re.M)
        assert len(rows) == 2, out
        for row in re.findall(rf"^{op} +3 .*$", out, re.M):
            *_, x_dense, x_predeq, err = row.split()
            float(x_dense), float(x_predeq)  # both bf16 baselines ran
            assert float(err) < 2e-2
        mixed = re.findall(rf"^{op} +2\+4 +(?:magic|registers) +2 +16 .*$", out, re.M)
        assert len(mixed) == 2, out
        for row in mixed:
            assert float(row.split()[-1]) < 2e-2  # one launch and per group vs the XLA path
