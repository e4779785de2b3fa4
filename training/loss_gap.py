"""Figure 1 of the paper: Loss-Gap_t against t for several n. Same as ``memsep loss-gap``; see --help."""

import sys

from diffusers_memsep.cli import main

if __name__ == "__main__":
    sys.exit(main(command="loss-gap"))
