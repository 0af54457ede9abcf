"""``python -m netloader`` is the ``netloader`` command."""

import sys

from netloader.cli import main

sys.exit(main())
