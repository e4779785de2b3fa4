"""The trainer's public names, kept importable from ``diffusers_memsep.training``.

The code lives in :mod:`diffusers_memsep.trainer` (loss, config, loop, checkpoints, output, factories).
"""

from .trainer import *  # noqa: F401,F403
from .trainer import __all__  # noqa: F401
