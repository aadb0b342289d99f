"""`python -m metafilm`: the same command line as `metafilm`."""

from metafilm.cli import main

raise SystemExit(main())
