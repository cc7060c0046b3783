"""The Triton kernels' machine code, read without a GPU: instructions per weight code.

For each op, bit width and dequant mode it exports the kernel launch for CUDA (``jax.export``,
as the lowering tests do), takes the Triton IR out of the custom call, compiles it with the
``triton`` package for a GPU architecture (default sm_90, H100/H200) and disassembles the
cubin with the ``nvdisasm`` shipped inside that package. From the kernel's main loop (one K
group per iteration) it prints, per weight code a thread handles: all instructions, shared-
memory stores and loads, and the tensor-core instructions per iteration, plus registers per
thread and shared memory per block. The H100 profile (benchmarks/results/h100-2026-11-24.md)
found the 4-bit kernels bound by this per-code work, not by bytes: 2-, 4- and 8-bit ran at the
same time.

These are static counts, not timings, and XLA's own Triton pipeline may schedule differently;
the GPU table of ``benchmarks.kernels`` decides. Needs ``pip install triton==3.6.0`` (the
Triton of the jaxlib GPU builds; not a dependency of the project).

  python -m benchmarks.kernel_sass                          # 4 tokens/expert, all bits and modes
  python -m benchmarks.kernel_sass --bits 4 --tokens 512 --block_m 128 --num_stages 3
  python -m benchmarks.kernel_sass --bits 2,3,4,2+3+4 --dequant registers  # + one mixed launch

A ``--bits`` entry like ``2+3+4`` is one launch over that many bit groups (the 64 experts split
between them): its row gives the launch's registers and shared memory and, per branch in
that order, the instructions per code of the branch's main loop.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gm
from pallas_kernels import packing

TRITON_CALL = "__gpu$xla.gpu.triton"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", default="1,2,3,4,8")
    p.add_argument("--ops", default="gate_up,down")
    p.add_argument("--dequant", default=",".join(gm.DEQUANT_MODES))
    p.add_argument("--tokens", type=int, default=4, help="tokens per expert (64 experts)")
    p.add_argument("--block_m", type=int, default=16)
    p.add_argument("--block_n", type=int, default=128)
    p.add_argument("--num_warps", type=int, default=8)
    p.add_argument("--num_stages", type=int, default=2)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90, 80")
    return p.parse_args(argv)


KIMI_SHAPES = {"gate_up": (2048, 1408), "down": (1408, 2048)}  # op -> (K, output columns)


def export_launch(platform: str, bits: int | tuple[int, ...], fused: bool, m: int, g: int,
                  k: int, n: int, dtype=jnp.bfloat16,
                  config: gm.BlockConfig | None = None) -> jax.export.Exported:
    """One kernel launch over abstract packed weights, exported for ``platform`` on this CPU
    (``fused``: SwiGLU over ``[K, 2n]``; else ``[K, n]``). ``bits`` a tuple: one launch over
    that many bit groups, the ``g`` experts split between them as evenly as they go."""
    backend = {"tpu": "mosaic_tpu", "cuda": "triton"}[platform]
    cols = 2 * n if fused else n

    def abstract(b, size):
        return jax.eval_shape(
            lambda q, s: packing.pack(q, s, b, parts=2 if fused else 1),
            jax.ShapeDtypeStruct((size, k, cols), jnp.int32),
            jax.ShapeDtypeStruct((size, -(-k // 128), cols), jnp.bfloat16),
        )

    if isinstance(bits, int):
        weights = abstract(bits, g)
    else:
        sizes = [g // len(bits) + (i < g % len(bits)) for i in range(len(bits))]
        weights = tuple(abstract(b, size) for b, size in zip(bits, sizes, strict=True))
    op = gm.grouped_swiglu if fused else gm.grouped_matmul
    fn = jax.jit(lambda x, w, s: op(x, w, s, backend=backend, config=config))
    args = (jax.ShapeDtypeStruct((m, k), dtype), weights, jax.ShapeDtypeStruct((g,), jnp.int32))
    cuda = platform == "cuda"
    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if cuda else []
    return jax.export.export(fn, platforms=[platform], disabled_checks=disabled)(*args)


def triton_ir(op_name: str, bits: int | tuple[int, ...], tokens: int,
              config: gm.BlockConfig) -> str:
    """The Triton IR (text) of one launch at Kimi-VL expert shapes, lowered on this CPU."""
    k, n = KIMI_SHAPES[op_name]
    module = export_launch("cuda", bits, op_name == "gate_up", 64 * tokens, 64, k, n,
                           config=config)
    match = re.search(r'ir = "((?:[^"\\]|\\.)*)"', module.mlir_module())
    if match is None:
        raise RuntimeError("no Triton custom call in the exported module")
    return _ir_text(_unescape(match.group(1)))


def mosaic_body(module_text: str) -> str:
    """The Mosaic kernel of a launch exported for TPU, as MLIR text: the custom call carries
    it as base64 bytecode (what a TPU compiles; its layout passes run only there)."""
    from jax._src.lib import tpu  # jax's private dialect bindings (pinned jax 0.10.2)
    from jax._src.lib.mlir import ir

    call = module_text[module_text.index("tpu_custom_call"):]
    match = re.search(r'backend_config = "((?:[^"\\]|\\.)*)"', call)
    body = json.loads(_unescape(match.group(1)))["custom_call_config"]["body"]
    context = ir.Context()
    tpu.register_dialect(context)
    context.allow_unregistered_dialects = True
    with context:
        return ir.Module.parse(base64.b64decode(body)).operation.get_asm()


def _unescape(s: str) -> bytes:
    """An MLIR string attribute's escapes (``\\XX`` hex, ``\\\\``, ``\\"``) back to bytes."""
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1] in '\\"':
            out.append(ord(s[i + 1]))
            i += 2
        elif s[i] == "\\":
            out.append(int(s[i + 1 : i + 3], 16))
            i += 3
        else:
            out += s[i].encode()
            i += 1
    return bytes(out)


def _ir_text(bytecode: bytes) -> str:
    # jax's private Triton-dialect context (pinned jax 0.10.2): the bytecode needs its dialects.
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton.lowering import _new_ir_context

    with _new_ir_context():
        return ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)


def compile_sass(ttir: str, config: gm.BlockConfig, arch: int) -> tuple[str, int, int]:
    """(SASS text, registers per thread, shared bytes per block) of the IR for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=options)
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = _run([os.path.join(tools, "nvdisasm"), "-c", cubin])
        usage = _run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin])
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    return sass, regs, int(kernel.metadata.shared)


def _run(cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the backward-branch loop holding the most tensor-core instructions."""
    return main_loops(sass)[0]


def main_loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every backward-branch loop holding the most tensor-core instructions,
    in code order (a launch over several bit groups has one such loop per branch)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^(\.L_x_\d+):", line.strip()))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)] : i + 1]
            loops.append((sum("MMA" in b for b in body), body))
    most = max((mma for mma, _ in loops), default=0)
    out = []
    for mma, body in loops:
        if mma != most:
            continue
        counts = collections.Counter()
        for line in body:
            m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
            if m:
                counts[m.group(1)] += 1
        out.append(counts)
    return out or [collections.Counter()]


def summarize(counts: collections.Counter, codes_per_thread: int) -> dict[str, float]:
    total = sum(counts.values())
    sts = sum(v for k, v in counts.items() if k.startswith("STS"))
    lds = sum(v for k, v in counts.items() if k.startswith("LDS"))
    mma = sum(v for k, v in counts.items() if "MMA" in k)
    per = lambda v: v / codes_per_thread
    return {"instr": per(total), "sts": per(sts), "lds": per(lds), "mma": mma, "total": total}


def run(args) -> None:
    print(f"jax {jax.__version__}; sm_{args.arch}; 64 experts, {args.tokens} tokens/expert")
    print("command: python -m benchmarks.kernel_sass " + " ".join(sys.argv[1:]))
    print("per weight code a thread handles in the main loop (one K group per iteration):")
    print(f"{'op':8} {'bits':>4} {'dequant':>9} {'regs':>4} {'smem_KB':>7} {'loop_instr':>10} "
          f"{'instr/code':>10} {'STS/code':>8} {'LDS/code':>8} {'MMA/iter':>8}")
    for op_name in args.ops.split(","):
        outputs = 2 if op_name == "gate_up" else 1
        for entry in args.bits.split(","):
            widths = tuple(int(b) for b in entry.split("+"))
            for mode in args.dequant.split(","):
                config = gm.BlockConfig(args.block_m, args.block_n, args.num_warps,
                                        args.num_stages, dequant=mode)
                ran = {gm.effective_dequant(mode, b, "triton") for b in widths}
                label = mode if ran == {mode} else f"{mode}>{'/'.join(sorted(ran))}"
                bits = widths[0] if len(widths) == 1 else widths
                sass, regs, smem = compile_sass(
                    triton_ir(op_name, bits, args.tokens, config), config, args.arch)
                block_n = gm._fit_block_n(args.block_n, KIMI_SHAPES[op_name][1])
                codes = outputs * 128 * block_n // (32 * args.num_warps)
                loops = [summarize(c, codes) for c in main_loops(sass)]
                cell = lambda key, fmt, loops=loops: "/".join(format(s[key], fmt) for s in loops)
                print(f"{op_name:8} {entry:>4} {label:>9} {regs:4d} {smem / 1024:7.1f} "
                      f"{cell('total', 'd'):>10} {cell('instr', '.2f'):>10} "
                      f"{cell('sts', '.2f'):>8} {cell('lds', '.2f'):>8} {loops[0]['mma']:8d}")


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
