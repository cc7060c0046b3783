"""The machine-code reader of benchmarks/kernel_sass.py: IR extraction, loop counting, and (where
the optional ``triton`` package is installed) the compiled kernels' shared-memory traffic."""

import collections

import pytest

from benchmarks import kernel_sass
from pallas_kernels import grouped_matmul as gm

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LOP3.LUT R2, R2, 0xf, RZ, 0xc0, !PT ;
        /*0020*/                   @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   STS.U16 [R3], R2 ;
        /*0050*/                   @!P1 LDS.64 R6, [R3] ;
        /*0060*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0070*/                   @P1 BRA `(.L_x_1) ;
        /*0080*/                   BRA `(.L_x_0) ;
"""


def test_main_loop_is_the_backward_loop_with_most_tensor_core_instructions():
    # Three backward branches: .L_x_0's own (no MMA), .L_x_1's (2 MMAs) and the outer one back
    # to .L_x_0, which also spans 2 MMAs; the first loop found with the most wins.
    counts = kernel_sass.main_loop(SASS)
    assert counts == collections.Counter({"HMMA": 2, "STS": 1, "LDS": 1, "BRA": 1})
    summary = kernel_sass.summarize(counts, codes_per_thread=2)
    assert summary["sts"] == 0.5 and summary["instr"] == 2.5 and summary["mma"] == 2


def test_main_loops_lists_every_loop_with_the_most_tensor_core_instructions_in_order():
    """A launch over several bit groups has one K loop per branch: each is reported."""
    two = """
.L_x_0:
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   STS.U16 [R3], R2 ;
        /*0020*/                   @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LOP3.LUT R2, R2, 0xf, RZ, 0xc0, !PT ;
        /*0040*/                   @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/                   LOP3.LUT R2, R2, 0xf, RZ, 0xc0, !PT ;
        /*0070*/                   @P1 BRA `(.L_x_2) ;
"""
    assert kernel_sass.main_loops(two) == [
        collections.Counter({"HMMA": 1, "STS": 1, "BRA": 1}),
        collections.Counter({"HMMA": 1, "LOP3": 1, "BRA": 1}),
    ]
    assert kernel_sass.main_loop(two) == kernel_sass.main_loops(two)[0]


def test_mixed_launch_has_one_k_loop_and_dot_per_bit_group():
    config = gm.BlockConfig(16, 128, 8, 2, dequant="registers")
    ir = kernel_sass.triton_ir("down", (2, 3, 4), 1, config)
    assert ir.count("scf.for") == 3 and ir.count("tt.dot ") == 3
    assert kernel_sass.triton_ir("down", 4, 1, config).count("scf.for") == 1


def test_unescape_reads_mlir_string_escapes():
    assert kernel_sass._unescape(r"ML\EFR\0D\\\"a") == b'ML\xefR\r\\"a'


@pytest.mark.parametrize("mode,joins", [("registers", True), ("magic", False)])
def test_triton_ir_of_each_mode(mode, joins):
    """The register mode gathers a word's slots with joins; magic broadcasts and reshapes."""
    config = gm.BlockConfig(16, 128, 8, 2, dequant=mode)
    ir = kernel_sass.triton_ir("down", 4, 1, config)
    assert "tt.dot" in ir
    assert ("tt.join" in ir) == joins


@pytest.mark.slow
def test_registers_mode_keeps_dequantized_codes_out_of_shared_memory():
    """Compiled for sm_90: magic stores every code to shared memory, registers none."""
    pytest.importorskip("triton")
    per_code = {}
    for mode in ("magic", "registers"):
        config = gm.BlockConfig(16, 128, 8, 2, dequant=mode)
        sass, _, _ = kernel_sass.compile_sass(kernel_sass.triton_ir("down", 4, 4, config),
                                              config, 90)
        per_code[mode] = kernel_sass.summarize(kernel_sass.main_loop(sass), 64)["sts"]
    assert per_code["magic"] >= 1.0 and per_code["registers"] < 0.1
