"""Triton kernels of fastforget (installed as fastforget.kernels): @triton.jit kernels and their
launch helpers, nothing else. Validation, dispatch and autograd live in fastforget.ops."""
