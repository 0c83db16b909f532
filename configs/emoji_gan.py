"""The GAN text-to-image pipeline on the emoji corpus at 64 px, in one command on a 2-core CPU:

    python -m dalle_jax.data.emoji data/emoji            # once: writes train/ and eval/ shards
    python train.py --config configs/emoji_gan.py --workdir runs/emoji [key=value ...]

Stages as configs/shapes_gan.py: `clip` (exactly configs/emoji_clip.py), the flow-matching
`prior` and the GAN `decoder` on the frozen CLIP (no refine stage), then workdir/model.npz.
The eval pictures are the held-out emoji, whose names training never saw. A small budget
(~3,400 pictures, a few epochs of the decoder): the figures in benchmarks/RESULTS.md say what
it reaches.
"""

import ml_collections

from dalle_jax import config as config_lib


def get_config():
    gan = config_lib.sibling_module(__file__, "shapes_gan.py")
    c = gan.get_config()  # the shapes stages, on emoji at 64 px
    c.clip = config_lib.sibling(__file__, "emoji_clip.py")
    c.prior = gan.flow_prior()  # the prior its figures in benchmarks/RESULTS.md were measured with
    data = c.clip.data.to_dict()
    c.prior.data = dict(data, global_batch=128)
    c.prior.total_steps = 200
    c.prior.optim.warmup_steps = 40
    c.prior.eval_every = 100
    c.prior.eval = dict(num_examples=382, use_ema=True)
    c.prior.checkpoint_every = 100

    c.decoder.data = dict(data, global_batch=32)
    c.decoder.total_steps = 500
    c.decoder.optim.lr = 5e-3  # the rate its figures in benchmarks/RESULTS.md were measured at
    c.decoder.model.channels = (64, 64, 32, 16, 16)   # 4, 8, 16, 32, 64 px
    c.decoder.model.d_channels = (16, 16, 32, 64, 128)
    c.decoder.eval_every = 250
    c.decoder.eval = dict(num_examples=128, use_ema=True)
    c.decoder.checkpoint_every = 100
    # Its figures predate the shapes decoder's best-of-8 search (session 25), untried here.
    c.decoder.loss.reconstruction_samples = 1
    c.decoder.loss.reconstruction_search = False
    del c.refine  # the shapes refine stage dwells on shapes' kinds
    return ml_collections.ConfigDict(c)
