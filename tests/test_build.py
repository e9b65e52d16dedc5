"""The native extensions and the Triton kernels build here, for the GPU too, without one."""
import os
import subprocess
import sys

import pytest
import torch

from fastforget import native


def test_cpu_extension_builds_and_registers_its_ops():
    assert native.unavailable_reason("cpu") is None
    assert hasattr(native.ops("cpu"), "unlearn_loss_forward")
    assert hasattr(native.ops("cpu"), "unlearn_loss_scale_grad")
    assert hasattr(native.ops("cpu"), "make_teacher_batch")
    assert hasattr(native.ops("cpu"), "vq_quantize")
    for name in ("token_embed_forward", "token_embed_backward", "token_embed"):
        assert hasattr(native.ops("cpu"), name), name


@pytest.mark.skipif(native.cuda_home() is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_cuda_extension_compiles():
    """Compiled on every CI run, GPU or not, so the CUDA code cannot rot between GPU leases."""
    assert native.unavailable_reason("cuda") is None
    assert hasattr(native.ops("cuda"), "unlearn_loss_forward")
    assert hasattr(native.ops("cuda"), "unlearn_loss_scale_grad")
    assert hasattr(native.ops("cuda"), "make_teacher_batch")
    for name in ("make_diffusion_inputs", "group_norm_silu_forward", "group_norm_silu_backward", "group_norm_silu"):
        assert hasattr(native.ops("cuda"), name), name
    assert hasattr(native.ops("cuda"), "vq_quantize")
    for name in ("token_embed_forward", "token_embed_backward", "token_embed"):
        assert hasattr(native.ops("cuda"), name), name


def test_triton_kernels_compile_for_sm90_with_wide_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastforget.kernels.aot"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ones = [line for line in lines if "rows=1" in line or "count=1" in line]
    assert len(ones) == 12  # batch 1 and one tensor: Triton passes those ints as constants
    forward = [line for line in lines if line.startswith("forward_kernel") and line not in ones]
    assert len(forward) == 72  # 4 dtype pairs x 3 normalisations x 3 modes x aligned or not
    aligned = [line for line in forward if "ALIGNED=1" in line]  # rows 16-byte aligned: 16-byte accesses
    assert len(aligned) == 36 and all("ld.global.v4" in line for line in aligned)
    assert all("st.global.v4" in line for line in aligned if "WRITE_GRAD=1" in line)
    for name in ("finalize_kernel", "count_kernel", "scale_kernel", "moments_kernel", "merge_kernel"):
        assert any(line.startswith(name) for line in lines), name
    teacher_out = [line for line in lines if line.startswith("output_kernel")]
    assert len(teacher_out) == 18 and all("st.global.v4" in line for line in teacher_out)
    patch = [line for line in lines if line.startswith("patch_embed_kernel")]
    assert len(patch) == 20
    # group norm: 3 dtypes x FiLM or not x SiLU or not x the shortest and longest channel step, each
    # with wide accesses (16 bytes of float32, 8 of a 16-bit dtype: four lanes a thread)
    for name in ("norm_forward_kernel", "norm_backward_kernel"):
        norm = [line for line in lines if line.startswith(name)]
        assert len(norm) == 24 and all(("ld.global.v4" in line and "st.global.v4" in line) if "*fp32" in line
                                       else ("ld.global.v2" in line and "st.global.v2" in line) for line in norm)
    inputs = [line for line in lines if line.startswith("inputs_kernel")]
    assert len(inputs) == 6 and all("st.global.v4" in line for line in inputs)
    # vq_quantize: 5 (z, codebook) dtype pairs x 2 tuning configs x e a multiple of 16 or not; float32
    # FMA, no tensor-core instruction (TF32 or 16-bit products would move the tokens)
    vq = [line for line in lines if line.startswith("vq_argmin_kernel")]
    assert len(vq) == 20 and not any("mma" in line for line in vq)
    # token_embed: 3 dtypes x the narrowest row block and MAGE's 1024-wide one; 16-byte row reads there
    for name in ("token_forward_kernel", "token_backward_kernel"):
        token = [line for line in lines if line.startswith(name)]
        assert len(token) == 6 and all("ld.global.v4" in line for line in token if "ROWS=4" in line)
    # its backward's segment sums: 3 dtypes x 2 column tiles, 16-byte reads of the float32 dx rows
    segments = [line for line in lines if line.startswith("token_segment_sum_kernel")]
    assert len(segments) == 6 and all("ld.global.v4" in line for line in segments)
    # Hopper's tensor-core instruction for every 16-bit and tf32 variant.
    assert all("wgmma.mma_async" in line for line in patch if "*bf16" in line or "*fp16" in line or "tf32" in line)


def test_missing_compiler_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        native._check_toolchain("cpu")


def test_missing_toolkit_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(native, "cuda_home", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(native.NativeUnavailable, match="no CUDA toolkit"):
        native._check_toolchain("cuda")


def test_cuda_home_follows_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("")
    wrapper = tmp_path / "wrappers" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert native.cuda_home() == str(toolkit)


def test_a_failed_build_is_not_retried_on_every_call(monkeypatch):
    """Ops ask for their extension on every call: a build that failed once answers at once."""
    attempts = []

    def failing(name):
        attempts.append(name)
        raise native.NativeUnavailable("building the cpu extension failed: error: boom")

    monkeypatch.setattr(native, "_build_and_load", failing)
    monkeypatch.setattr(native, "_failures", {})
    for _ in range(3):
        assert "boom" in native.unavailable_reason("cpu")
    assert attempts == ["cpu"]


def test_a_prebuilt_binary_is_used_only_for_its_own_sources_torch_and_cpu(tmp_path, monkeypatch):
    """setup.py names each binary by native.build_key; a stale one is passed over, with a warning."""
    monkeypatch.setattr(native, "PACKAGE_DIR", str(tmp_path))
    stale = tmp_path / "_cpu_000000000000.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"")
    with pytest.warns(UserWarning, match="built for other sources, another torch or another CPU"):
        assert native.prebuilt("cpu") is None
    current = tmp_path / f"_cpu_{native.build_key('cpu')}.cpython-311-x86_64-linux-gnu.so"
    current.write_bytes(b"")
    assert native.prebuilt("cpu") == str(current)
    assert native.build_key("cpu") != native.build_key("cuda")
