"""`python -m kpipe ...` (and `torchrun -m kpipe train ...`) run the same CLI as `kpipe`."""

import sys

from kpipe.cli import main

sys.exit(main())
