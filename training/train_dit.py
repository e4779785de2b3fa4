"""Train a DiT and write a MemSepPipeline folder. Same as ``memsep train``; see --help.

    accelerate launch training/train_dit.py --output_dir outputs/dit-digits
    python training/train_dit.py --output_dir outputs/dit-digits
"""

import sys

from diffusers_memsep.cli import main

if __name__ == "__main__":
    sys.exit(main(command="train"))
