"""GS-EMA in other trainers: nnU-Net v2 (``nnunet``), Lightning (``lightning``), MONAI's ignite engines (``monai``)
and TensorBoard (``tensorboard``).

Each integration is its own module and needs its optional extra (``pip install "gsema-fast[nnunet]"`` and so on);
nothing else in the package imports them, so the core never loads nnU-Net, Lightning, ignite or TensorBoard. A module
whose extra is missing, or installed but failing to import, raises :class:`MissingExtraError`, an ``ImportError``
that is also a ``ValueError``, so the command line reports it in one line with exit code 2.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import traceback
from collections.abc import Iterator

# Where the documentation says how to install torchvision beside a CPU build of torch.
TORCHVISION_DOC = 'docs/integrations.md, "torchvision beside a CPU torch"'


def _involves_torchvision(err: BaseException) -> bool:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "torchvision" in str(err) or any(
            "torchvision" in frame.filename for frame in traceback.extract_tb(err.__traceback__)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class MissingExtraError(ImportError, ValueError):
    """An integration was asked for without its optional packages, or with packages that fail to import.

    ``cause``: the import failure, when there was one; the message then says what failed and how to fix it.
    """

    def __init__(self, extra: str, what: str, cause: BaseException | None = None) -> None:
        install = f'pip install "gsema-fast[{extra}]"'
        torchvision = cause is not None and _involves_torchvision(cause)
        if cause is None or (isinstance(cause, ModuleNotFoundError) and not torchvision):
            message = f"{what} needs the optional '{extra}' packages: {install}"
        else:
            failure = " ".join(f"{type(cause).__name__}: {cause}".split())
            if torchvision and isinstance(cause, ModuleNotFoundError):
                fix = f"install the torchvision built for torch {_version('torch')} ({TORCHVISION_DOC})"
            elif torchvision:
                fix = (
                    f"torchvision {_version('torchvision')} was not built for torch {_version('torch')}: install the "
                    f"one built for this torch, or uninstall it if nothing needs it ({TORCHVISION_DOC})"
                )
            else:
                fix = f'reinstall them: pip install --force-reinstall "gsema-fast[{extra}]"'
            message = f"{what}: importing its optional '{extra}' packages failed ({failure}); {fix}"
        super().__init__(message)
        self.extra = extra


@contextlib.contextmanager
def optional_imports(extra: str, what: str) -> Iterator[None]:
    """Imports of an extra's packages: any failure (a missing package, or an installed one that raises while it is
    imported, such as a torchvision built for another torch) becomes a :class:`MissingExtraError` naming the fix."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (an import can fail with anything; each is reported the same way)
        raise MissingExtraError(extra, what, err) from err
