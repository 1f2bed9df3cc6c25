"""``python -m fsmchat``: the same as the ``fsmchat`` command."""

from fsmchat.cli import main

raise SystemExit(main())
