"""CLIP on the emoji corpus at 64 px (real pictures: the Noto Color Emoji font, named by CLDR).

    python -m dalle_jax.data.emoji data/emoji            # once: writes train/ and eval/ shards
    python train.py --config configs/emoji_clip.py --workdir runs/emoji_clip [key=value ...]

Evaluated by zero-shot retrieval between the held-out emoji and their names (data.eval_path):
names never seen in training, so the score is how far CLIP composes known words ("cat" and
"face" -> "cat face"). data.path / data.eval_path point elsewhere for a corpus written elsewhere.
"""

import ml_collections

from dalle_jax import config as config_lib


def get_config():
    c = config_lib.sibling(__file__, "shapes_clip.py")  # the same loop; data and budget differ
    # The ViT tower and learning rate this corpus was measured with (benchmarks/RESULTS.md),
    # not the shapes config's convolutional tower.
    c.model = dict(variant="tiny")
    c.optim.lr = 1e-3
    c.total_steps = 200
    # ~3,400 training emoji: 200 steps of 128 are ~8 epochs (a 2-core CPU's budget). Random
    # crops along the longer side do nothing to square pictures; caption dropout is the
    # generators' business.
    c.data = dict(name="shards", path="data/emoji/train", eval_path="data/emoji/eval",
                  split="train", seed=0, image_size=64, context_length=24, global_batch=128,
                  num_threads=2, hard_negatives=0, shuffle_buffer=1000, caption_dropout=0.0,
                  random_crop=False)
    c.optim.warmup_steps = 60
    c.eval_every = 100
    c.eval = dict(num_examples=400, use_ema=False)
    c.checkpoint_every = 100
    return ml_collections.ConfigDict(c)
