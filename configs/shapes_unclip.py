"""The unCLIP (DALL-E 2) pipeline on captioned shapes, beside the GAN's, on the same CLIP:

    python train.py --config configs/shapes_unclip.py --workdir runs/shapes_unclip [key=value ...]

Stages (each resumable, in workdir/<stage>): the frozen CLIP is the shipped GAN model's
(`clip.import_from = "shipped:gan"`, so the two generators are compared on one CLIP; set
`clip.import_from=""` to train it here as configs/shapes_clip.py does), then the diffusion
`prior` (causal Transformer, x0 target) and the diffusion `decoder` (ADM/GLIDE-style U-Net at
32 px, v target, cosine schedule); then workdir/model.npz, loaded by
`Pipeline.load(path, generator="unclip")`.
"""

import ml_collections

from dalle_jax import config as config_lib


def get_config():
    gan = config_lib.sibling_module(__file__, "shapes_gan.py")
    c = ml_collections.ConfigDict()
    c.family = "pipeline"
    c.export_dtype = "float32"
    c.clip = config_lib.sibling(__file__, "shapes_clip.py")
    c.clip.import_from = "shipped:gan"

    c.prior = gan.diffusion_prior()  # the GAN pipeline's prior too

    # 42.8 images/s on an idle 2-core Xeon: 3,000 steps of 64 take 75-80 minutes. v-prediction
    # with min-SNR-5 weighting (Salimans & Ho 2022; Hang et al. 2023), not eps: the eps decoder
    # drew black and white backgrounds grey (benchmarks/RESULTS.md, sessions 8 and 9). 3,000
    # steps, not 1,500: decoder-alone adherence rose from 56 / 61% at step 1,500 of this
    # schedule to 87 / 96% at 3,000 (session 10).
    c.decoder = gan._common("diffusion_decoder", total_steps=3000, global_batch=64, lr=1e-3,
                            ema_decay=0.995)
    c.decoder.optim.clip_norm = 1.0
    c.decoder.model = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                           attention_resolutions=(8,), num_heads=4, context_dim=64,
                           num_image_tokens=4, schedule="cosine", num_timesteps=1000,
                           prediction="v", min_snr_gamma=5.0, image_drop_prob=0.1,
                           text_drop_prob=0.5)
    c.decoder.eval_every = 500
    c.decoder.eval = dict(num_examples=200, use_ema=True, sample_steps=25, guidance_scale=3.0,
                          eta=1.0)
    return c
