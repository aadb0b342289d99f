"""`python -m metafilm`: the same command line as `metafilm` (and the module torchrun starts)."""

from metafilm.cli import main
from metafilm.distributed import exit_process

exit_process(main())
