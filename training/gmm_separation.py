"""Figures 2-3 of the paper and the measured capacity threshold on Gaussian mixtures. Same as ``memsep gmm``;
see --help."""

import sys

from diffusers_memsep.cli import main

if __name__ == "__main__":
    sys.exit(main(command="gmm"))
