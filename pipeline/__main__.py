"""`python -m pipeline` is the `pipeline` command."""

from __future__ import annotations

import sys

from .ops.cli import main

sys.exit(main())
