"""``python -m hybridssm``: the ``hybridssm`` command."""

import sys

from hybridssm.cli import main

sys.exit(main())
