"""``python -m edkm`` (and ``accelerate launch -m edkm``) runs the CLI."""

import sys

from edkm.cli import main

sys.exit(main())
