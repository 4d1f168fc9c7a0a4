"""``python -m model_compress.cli``: the `compress` command (what ``--gpus`` starts in each process)."""

from .app import main

raise SystemExit(main())
