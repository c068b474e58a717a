#!/usr/bin/env python
"""Compile farm.train.stacked_triton's kernels for an NVIDIA GPU architecture without a GPU: every launch that a
stacked SmallCNN of the given width makes (forward with pooling, gradient to the input from a pooled
gradient, weight gradients, and the unpooled forms), through Triton's own compiler and ptxas, specialised
as a launch specialises them (pointer arguments 16-byte aligned, as torch allocates). Catches what the CPU
interpreter cannot: lowering errors, shared memory beyond the card's, and operand loads the compiler could
not vectorise. Prints per kernel its compile time, shared memory, registers per thread and spilled bytes
(cuobjdump), and its global loads (see global_loads): asynchronous, copied to shared memory ahead of use by
the software pipeline, or into registers; "x8" is 8 elements at once, 16 bytes of bf16.

Fails where the deterministic tile (the first of farm.train.stacked_triton.TILES) needs more shared memory than
the card has (other tiles may: Triton's autotuner skips them), or where a layer whose channels fill whole
reduction tiles (contiguous along the channels) has a 2-D load of one element at a time. By default
each launch in its deterministic tile; --all-tiles also every tile that autotuning tries. Float32 is
compiled in tf32 and in full precision.

    python scripts/check_triton_compile.py                 # sm_90 (H100/H200), width 32, bf16 and fp32
    python scripts/check_triton_compile.py --width 4 --dtypes bf16
    python scripts/check_triton_compile.py --all-tiles     # minutes
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launches(width: int, precision: str) -> list[tuple[str, dict]]:
    """(kernel, constants) of a SmallCNN with one input channel: conv(1 -> w) and conv(w -> 2w), each
    followed by ReLU and a 2x2 max-pool, plus the unpooled forms (odd feature maps)."""
    from farm.train.stacked_triton import conv_constants, wgrad_constants

    out = []
    for c, o in ((1, width), (width, 2 * width)):
        out += [("conv", conv_constants(c, o, pool=True, x_pooled=False, has_bias=True, precision=precision)),
                ("conv", conv_constants(c, o, pool=False, x_pooled=False, has_bias=True, precision=precision)),
                ("wgrad", wgrad_constants(c, o, pooled=True, precision=precision)),
                ("wgrad", wgrad_constants(c, o, pooled=False, precision=precision))]
    # the gradient to conv2's input: conv2's taps flipped over its output gradient (2w -> w channels)
    out += [("conv", conv_constants(2 * width, width, pool=False, x_pooled=True, has_bias=False,
                                    precision=precision)),
            ("conv", conv_constants(2 * width, width, pool=False, x_pooled=False, has_bias=False,
                                    precision=precision))]
    return out


def signature(kernel: str, arg_names: list[str], const: dict, dtype: str) -> dict:
    """Argument types in the kernel's own order (Triton matches constants to arguments by position)."""
    pooled_in = const.get("X_POOLED") or const.get("G_POOLED")
    if kernel == "conv":
        args = {"x_ptr": f"*{dtype}", "sel_ptr": "*i8" if pooled_in else f"*{dtype}", "w_ptr": f"*{dtype}",
                "b_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "win_ptr": "*i8" if const["POOL"] else f"*{dtype}",
                "x_model_rows": "i64", "M": "i32", "H": "i32", "W": "i32"}
    else:
        args = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "sel_ptr": "*i8" if pooled_in else f"*{dtype}",
                "part_ptr": "*fp32", "M": "i32", "H": "i32", "W": "i32", "n_slices": "i32", "slice_len": "i32"}
    types = {**args, **dict.fromkeys(const, "constexpr")}
    if sorted(types) != sorted(arg_names):
        raise SystemExit(f"check_triton_compile: {kernel} takes {arg_names}, the check knows {list(types)}")
    return {name: types[name] for name in arg_names}


def resources(cubin: bytes, cuobjdump: str) -> tuple[int, int]:
    """(registers per thread, local memory per thread in bytes: what ptxas spilled) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage)[1]), int(re.search(r"LOCAL:(\d+)", usage)[1])


BLOCKED = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*order = \[([\d, ]+)\]", re.M)
LOAD = re.compile(r"(tt\.load|ttg\.async_copy_global_to_local) .*?(?:\{contiguity = (\d+) : i32\} )?"
                  r": tensor<([\dx]+)x!tt\.ptr<\w+>, (#\w+)>.*loc\((#loc\d+)\)")


def global_loads(ttgir: str) -> list[tuple[str, int, int]]:
    """(kind, rank, elements) of each global load in Triton's GPU IR, once per source location (the software
    pipeline repeats a load for each stage it runs ahead). Kind "async": copied to shared memory ahead of
    use, elements = the copy's vector width; "registers": loaded into registers, elements = how many
    consecutive ones each thread holds along the layout's fastest axis (the most one instruction may load;
    1 means one at a time)."""
    per_thread = {name: [int(v) for v in sizes.split(",")][int(order.split(",")[0])]
                  for name, sizes, order in BLOCKED.findall(ttgir)}
    loads = {}
    for op, contiguity, shape, layout, loc in LOAD.findall(ttgir):
        if "async" in op:
            loads.setdefault(loc, ("async", shape.count("x") + 1, int(contiguity or 1)))
        else:
            loads.setdefault(loc, ("registers", shape.count("x") + 1, per_thread.get(layout, 0)))
    return list(loads.values())


def scalar_loads(loads: list[tuple[str, int, int]]) -> int:
    """How many 2-D operand loads move one element per thread at a time."""
    return sum(1 for _, rank, vec in loads if rank == 2 and vec == 1)


def describe(loads: list[tuple[str, int, int]]) -> str:
    parts = []
    for kind in ("async", "registers"):
        vecs = [f"x{vec}" for k, rank, vec in loads if k == kind and rank == 2]
        if vecs:
            parts.append(f"{kind} {' '.join(vecs)}")
    return "; ".join(parts) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    ap.add_argument("--width", type=int, default=32, help="SmallCNN width (the presets' is 32)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--all-tiles", action="store_true", help="every tile of TILES, not only the first")
    ap.add_argument("--shared-memory", type=int, default=227 * 1024,
                    help="bytes of shared memory a block may use (H100/H200: 227 KiB)")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from farm.train import stacked_triton

    kernels = {"conv": stacked_triton._conv3x3_kernel, "wgrad": stacked_triton._conv3x3_wgrad_kernel}
    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    over, scalar = 0, 0
    tiles = stacked_triton.TILES if args.all_tiles else stacked_triton.TILES[:1]
    # float32 runs in tf32 by default and in full precision where torch.backends.cudnn.allow_tf32 is off
    runs = [(dtype, precision) for dtype in args.dtypes for precision in (("tf32", "ieee") if dtype == "fp32"
                                                                          else ("tf32",))]
    for dtype, precision in runs:
        for name, const in launches(args.width, precision):
            seen = set()
            for block_m, warps, stages in tiles:
                if name == "conv":
                    const = {**const, "BLOCK_M": block_m}
                elif (warps, stages) in seen:  # the weight gradient's BLOCK_M is fixed: same kernel again
                    continue
                seen.add((warps, stages))
                sig = signature(name, kernels[name].arg_names, const, dtype)
                names = list(sig)
                # a launch marks each pointer to a 16-byte aligned tensor (all of torch's allocations) as such
                aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(names) if sig[arg].startswith("*")}
                src = ASTSource(fn=kernels[name], signature=sig, attrs=aligned,
                                constexprs={(names.index(key),): value for key, value in const.items()})
                t0 = time.perf_counter()
                compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                seconds = time.perf_counter() - t0
                shared = compiled.metadata.shared
                registers, spilled = resources(compiled.asm["cubin"], cuobjdump)
                loads = global_loads(compiled.asm["ttgir"])
                problems = []
                if shared > args.shared_memory and (block_m, warps, stages) == stacked_triton.TILES[0]:
                    over += 1
                    problems.append("SHARED MEMORY OVER THE LIMIT")
                elif shared > args.shared_memory:  # Triton's autotuner skips a tile that fails to launch
                    problems.append("over the shared memory limit: autotuning skips this tile")
                # channels in whole reduction tiles: every operand row is contiguous, so it must load as vectors
                if const["C"] % const["BLOCK_R"] == 0 and scalar_loads(loads):
                    scalar += 1
                    problems.append("SCALAR OPERAND LOADS")
                flags = " ".join(f"{key}={value}" for key, value in const.items())
                print(f"  {name:<5} {dtype:<4} {flags} warps={warps} stages={stages}: {seconds:5.1f} s, "
                      f"shared memory {shared} B, {registers} registers, {spilled} B spilled, "
                      f"loads: {describe(loads)}{''.join(' -- ' + p for p in problems)}", flush=True)
    if over or scalar:
        raise SystemExit(f"check_triton_compile: for sm_{args.arch}, {over} kernel(s) in the deterministic tile need "
                         f"more shared memory than it has, {scalar} load channel-contiguous operands one element at "
                         f"a time")
    print(f"all kernels compile for sm_{args.arch}")


if __name__ == "__main__":
    main()
