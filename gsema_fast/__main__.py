"""``python -m gsema_fast`` is the ``gsema-fast`` command (used by ``torchrun -m gsema_fast``)."""

from gsema_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
