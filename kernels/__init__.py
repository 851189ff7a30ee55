"""Triton kernels, one fused op per module; installed as ``gsema_fast.kernels``.

Each module holds the ``@triton.jit`` kernels, a launcher that validates its inputs, the torch reference that the
tests and the CPU path use, and one public function. Kernels import only torch and Triton.
"""
