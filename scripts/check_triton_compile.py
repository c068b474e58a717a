#!/usr/bin/env python
"""Compile farm.stacked_triton's kernels for an NVIDIA GPU architecture without a GPU: every launch that a
stacked SmallCNN of the given width makes (forward with pooling, gradient to the input from a pooled
gradient, weight gradients, and the unpooled forms), through Triton's own compiler and ptxas. Catches what
the CPU interpreter cannot: lowering errors, and shared memory beyond the card's. Prints each kernel's
compile time and shared memory (float32 in tf32 and in full precision). By default each launch in its
deterministic tile (the first of farm.stacked_triton.TILES); --all-tiles also every tile that
autotuning tries.

    python scripts/check_triton_compile.py                 # sm_90 (H100/H200), width 32, bf16 and fp32
    python scripts/check_triton_compile.py --width 4 --dtypes bf16
    python scripts/check_triton_compile.py --all-tiles     # minutes
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launches(width: int, precision: str) -> list[tuple[str, dict]]:
    """(kernel, constants) of a SmallCNN with one input channel: conv(1 -> w) and conv(w -> 2w), each
    followed by ReLU and a 2x2 max-pool, plus the unpooled forms (odd feature maps)."""
    from farm.stacked_triton import conv_constants, wgrad_constants

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
                "x_model_stride": "i64", "M": "i32", "H": "i32", "W": "i32"}
    else:
        args = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "sel_ptr": "*i8" if pooled_in else f"*{dtype}",
                "part_ptr": "*fp32", "M": "i32", "H": "i32", "W": "i32", "n_slices": "i32", "slice_len": "i32"}
    types = {**args, **dict.fromkeys(const, "constexpr")}
    if sorted(types) != sorted(arg_names):
        raise SystemExit(f"check_triton_compile: {kernel} takes {arg_names}, the check knows {list(types)}")
    return {name: types[name] for name in arg_names}


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

    from farm import stacked_triton

    kernels = {"conv": stacked_triton._conv3x3_kernel, "wgrad": stacked_triton._conv3x3_wgrad_kernel}
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
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
                src = ASTSource(fn=kernels[name], signature=sig,
                                constexprs={(names.index(key),): value for key, value in const.items()})
                t0 = time.perf_counter()
                compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                shared = compiled.metadata.shared
                ok = shared <= args.shared_memory
                failures += not ok
                flags = " ".join(f"{key}={value}" for key, value in const.items())
                print(f"  {name:<5} {dtype:<4} {flags} warps={warps} stages={stages}: "
                      f"{time.perf_counter() - t0:5.1f} s, shared memory {shared} B"
                      f"{'' if ok else ' -- OVER THE LIMIT'}", flush=True)
    if failures:
        raise SystemExit(f"check_triton_compile: {failures} kernel(s) need more shared memory than sm_{args.arch} has")
    print(f"all kernels compile for sm_{args.arch}")


if __name__ == "__main__":
    main()
