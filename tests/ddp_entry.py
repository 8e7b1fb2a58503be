"""torchrun entry for tests/test_ddp.py: kpipe's command line with one fault planted (KPIPE_TEST_FAULT).

slow_checkpoint: rank 0 takes 3 s to write each checkpoint, as a large one on a slow disk does, so a
rank that reads best.pt before rank 0 has written it fails every time instead of now and then.
raise_on_rank1: rank 1 fails in its first epoch, as an out-of-memory error or a bad batch would.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from kpipe.cli import main
from kpipe.errors import KpipeError
from kpipe.stages import train

FAULT, RANK = os.environ.get("KPIPE_TEST_FAULT", ""), int(os.environ.get("RANK", "0"))

if FAULT == "slow_checkpoint" and RANK == 0:
    real_save = train.save_checkpoint

    def slow_save(path: Path, payload: dict[str, Any]) -> None:
        time.sleep(3)
        real_save(path, payload)

    train.save_checkpoint = slow_save
elif FAULT == "raise_on_rank1" and RANK == 1:

    def fail(*_: Any, **__: Any) -> Any:
        raise KpipeError("planted failure on rank 1")

    train.train_epoch = fail

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
