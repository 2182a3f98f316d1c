"""``python -m dcy._register_cli``: the same as the ``dcy-register`` console script."""

import sys

from dcy._register_cli import main

sys.exit(main())
