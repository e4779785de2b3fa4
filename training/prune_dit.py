#!/usr/bin/env python
"""Algorithm 1 end to end on a saved MemSepPipeline: ``python training/prune_dit.py --pipeline DIR --output_dir OUT``.

Same command line as ``memsep prune`` (see ``diffusers_memsep/commands/prune.py``).
"""

import sys

from diffusers_memsep.cli import main

if __name__ == "__main__":
    sys.exit(main(command="prune"))
