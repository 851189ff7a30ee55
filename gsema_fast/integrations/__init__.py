"""GS-EMA in other trainers: nnU-Net v2 (``nnunet``), Lightning (``lightning``) and TensorBoard (``tensorboard``).

Each integration is its own module and needs its optional extra (``pip install "gsema-fast[nnunet]"`` and so on);
nothing else in the package imports them, so the core never loads nnU-Net, Lightning or TensorBoard. A module
whose extra is missing raises :class:`MissingExtraError`, an ``ImportError`` that is also a ``ValueError``, so the
command line reports it in one line with exit code 2.
"""

from __future__ import annotations


class MissingExtraError(ImportError, ValueError):
    """An integration was asked for without its optional packages."""

    def __init__(self, extra: str, what: str) -> None:
        super().__init__(f"{what} needs the optional '{extra}' packages: pip install \"gsema-fast[{extra}]\"")
        self.extra = extra
