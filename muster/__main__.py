"""``python -m muster``: the same dispatcher as the ``muster`` console script."""

from muster.cli import main

raise SystemExit(main())
