"""``python -m bench``: run the benchmarks and write the report."""

from bench.cli import main

raise SystemExit(main())
