"""Draw pictures from a prompt: python sample.py "a large red circle in the top left" """

import sys

from dalle_jax.cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
