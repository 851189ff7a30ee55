"""The fused ops in plain torch: the CPU path, the references the Triton kernels are tested against, and the
torch-only pieces the kernels share (input validation, the FFT high-pass, CUDA-graph-safe caches).

Nothing here imports Triton, so the package runs on the CPU of any platform without it; ``gsema_fast.kernels`` builds
on these modules and is imported only when a kernel is launched.
"""
