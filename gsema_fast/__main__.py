"""``python -m gsema_fast`` is the ``gsema-fast`` command (used by ``torchrun -m gsema_fast``)."""

import os

from gsema_fast.cli import main

if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # under torchrun: an unexpected error's traceback goes into the job's failure summary
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    raise SystemExit(main())
