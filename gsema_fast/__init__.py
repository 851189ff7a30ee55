"""gsema-fast: GS-EMA teacher-student training and fused Triton ops for domain-generalised 3D segmentation.

Submodules are imported on demand so that ``from gsema_fast import ops`` pulls in torch (and Triton on a GPU)
and nothing from MONAI, nibabel or the trainer.
"""

__version__ = "0.1.0"
