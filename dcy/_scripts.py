"""The console scripts: each checks the extra its program needs, then imports the program.

Importing a program only here keeps ``pip install dcy`` (no extras) usable: a missing extra
is a one-line message naming it, not an ImportError from inside jinja2's absence.
"""

from __future__ import annotations

import sys

from dcy._cli import require_extra


def template() -> None:
    require_extra("dcy-template", "template")
    from dcy.template.cli import main

    sys.exit(main())


def register() -> None:
    require_extra("dcy-register", "register")
    from dcy._register_cli import main

    sys.exit(main())


def alert() -> None:
    from dcy.alert import main

    sys.exit(main())
