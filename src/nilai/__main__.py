"""Allow ``python -m nilai``."""

from nilai.cli import main

raise SystemExit(main())
