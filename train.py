"""Train a dalle_jax model: python train.py --config configs/shapes_clip.py --workdir runs/clip"""

import sys

from dalle_jax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
