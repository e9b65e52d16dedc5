"""Ahead-of-time compilation of the Triton kernels for a GPU, with no GPU present.

`python -m fastforget.kernels.aot` compiles every variant that kernels/<op>.py's aot_variants()
lists for sm_90 (H100/H200) and reports each kernel's memory instructions, so a kernel the
interpreter accepts but the compiler rejects fails in CI, and the PTX shows 16-byte accesses.
Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""
from __future__ import annotations

import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import diffusion_inputs, group_norm, patch_embed, teacher_batch, unlearn_loss
from . import vq_quantize
from . import token_embed

MODULES = (unlearn_loss, teacher_batch, patch_embed, group_norm, diffusion_inputs, vq_quantize, token_embed)
H200 = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, signature, constexprs, aligned, num_warps, target=H200):
    """The compiled kernel. Pointers are 16-byte aligned (torch allocations are); so are the int
    arguments named in `aligned`, as Triton's specialisation finds them at run time."""
    names = kernel.arg_names
    full = {name: signature.get(name, "constexpr") for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if full[n].startswith("*") or n in aligned}
    src = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def memory_ops(ptx: str) -> list[str]:
    return sorted(set(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx)))


def matrix_ops(ptx: str) -> list[str]:
    """Tensor-core instructions (mma.sync, Hopper's wgmma) in the PTX."""
    return sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[.\w]*", ptx)))


def main() -> int:
    for module in MODULES:
        for kernel, signature, constexprs, aligned, num_warps in module.aot_variants():
            compiled = compile_variant(kernel, signature, constexprs, aligned, num_warps)
            switches = ",".join(f"{k}={v if isinstance(v, str) else int(v)}" for k, v in constexprs.items()
                                if "BLOCK" not in k and k != "STEPS")
            dtype = next((signature[k] for k in ("student_ptr", "s_like_ptr", "g_like_ptr", "grad_ptr", "weight_ptr", "x_ptr", "dy_ptr", "y0_ptr", "z_ptr", "word_ptr") if k in signature), "")
            ptx = compiled.asm["ptx"]
            print(f"{kernel.__name__:<16} {dtype:<6} {switches:<50} {' '.join(memory_ops(ptx) + matrix_ops(ptx))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
