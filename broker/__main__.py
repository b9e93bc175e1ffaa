"""``python -m broker`` is the ``sse-broker`` command."""

import sys

from broker.cli import main

sys.exit(main())
