"""``python -m fedlpp.cli``: the ``fedlpp`` command."""

import sys

from fedlpp.cli.main import main

sys.exit(main())
