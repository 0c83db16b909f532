"""The GAN text-to-image pipeline on captioned shapes, trained in one command on a 2-core CPU:

    python train.py --config configs/shapes_gan.py --workdir runs/shapes [key=value ...]

Stages (each resumable, in workdir/<stage>): `clip` (exactly configs/shapes_clip.py), then the
diffusion `prior` (unCLIP's, as configs/shapes_unclip.py trains it) and the GAN `decoder` on the
frozen CLIP, then `refine`, a short fine-tune of the decoder's generator; then workdir/model.npz.
configs/shapes_gan_layout.py adds a `layout` stage (caption -> 8x8 map of where each named
object goes) that the refine stage's generator reads.
Override a stage's field by its path, e.g. decoder.total_steps=500 or clip.optim.lr=2e-3.
"""

import ml_collections

from dalle_jax import config as config_lib


def _common(family, total_steps, global_batch, lr, ema_decay):
    return dict(
        family=family, seed=0, total_steps=total_steps,
        data=dict(name="shapes", split="train", seed=0, image_size=32, context_length=16,
                  global_batch=global_batch, num_threads=2, hard_negatives=0),
        dtype="float32", remat=False, grad_accum_steps=1,
        mesh=dict(data=-1, fsdp=1), sharding=dict(params="replicate", rules=[]),
        log_every=20, checkpoint_every=250, keep_checkpoints=2, progress_bar=True,
        nan_guard=dict(max_consecutive=20, action="rollback", lr_factor=0.5, max_rollbacks=3),
        optim=dict(lr=lr, warmup_steps=100, final_lr_fraction=0.1, weight_decay=0.0, b1=0.9,
                   b2=0.99, eps=1e-8, clip_norm=10.0, ema_decay=ema_decay,
                   clip_separately=False))


def flow_prior():
    """The flow-matching prior (`models/flow_prior.py`): an MLP from the text vector and token
    features to an image vector, 32 Euler steps."""
    p = ml_collections.ConfigDict(_common("prior", total_steps=1500, global_batch=256, lr=1e-3,
                                          ema_decay=0.99))
    p.model = dict(width=256, depth=4, sample_steps=32)
    p.eval_every = 500
    p.eval = dict(num_examples=1000, use_ema=True)
    return p


def diffusion_prior():
    """unCLIP's diffusion prior (`models/prior.py`), as configs/shapes_unclip.py trains it."""
    # Width 128: the Transformer reads 20 tokens per embedding, ~4x the cost of the flow prior's
    # MLP at width 256 (benchmarks/bench_unclip.py); 1,500 steps of 256 take 15 minutes on an
    # idle 2-core Xeon (438 images/s; 25 minutes beside other work).
    p = ml_collections.ConfigDict(_common("diffusion_prior", total_steps=1500, global_batch=256,
                                          lr=1e-3, ema_decay=0.99))
    p.model = dict(width=128, depth=4, num_heads=4, schedule="cosine", num_timesteps=1000,
                   prediction="x0", text_drop_prob=0.1)
    p.eval_every = 500
    p.eval = dict(num_examples=500, use_ema=True, sample_steps=25, guidance_scale=1.0)
    return p


def layout_stage():
    """The layout model (`models/layout.py`): caption -> 8x8 map of cell classes, a decoder-only
    Transformer over the CLIP's token embeddings, as `benchmarks/layout_probe.py` measured it
    (width 96, 3 layers, AdamW at 1e-3, batches of 64 with two-object scenes three times as
    often, ~56% of the batch, as the probe's 60%)."""
    p = ml_collections.ConfigDict(_common("layout", total_steps=4000, global_batch=64, lr=1e-3,
                                          ema_decay=0.0))
    p.optim.weight_decay = 0.01
    p.optim.warmup_steps = 200
    p.optim.final_lr_fraction = 0.0
    p.data.oversample = "two objects:3"
    p.model = dict(width=96, layers=3, num_heads=4)
    p.eval_every = 2000
    p.eval = dict(num_examples=600, use_ema=False, temperature=1.0)
    return p


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "pipeline"
    c.export_dtype = "float32"  # "bfloat16" halves the model file
    c.clip = config_lib.sibling(__file__, "shapes_clip.py")

    # unCLIP's diffusion prior, not the flow-matching one: fed to the same decoder on 1,000 eval
    # captions, one-object prompts right 75.6 / 78.1% (seen / held-out pairs) against 72.6 /
    # 71.5%; the flow prior's vectors for prompts that leave the background open fell between
    # two backgrounds' (a grey between black and grey, or grey and white) for 44 of 696
    # one-object pictures, this one's for 1-2 (benchmarks/RESULTS.md, session 26). It trains 15
    # minutes here, the flow prior 11.
    # `c.prior = flow_prior()` gives the flow prior back (options: truncation, prior_temperature).
    c.prior = diffusion_prior()

    # 7,000 steps of 64, then the refine stage's 2,400 (below): 67 + ~24 minutes at the 104-118
    # images/s of an idle 2-core Xeon with AVX-512 and the best-of-8 search (the 7,000 took 95
    # minutes at 83 images/s on a busier day; on a 2-core AMD EPYC with AVX2 only, 48 images/s,
    # where the 2,400 refine steps took 56 minutes).
    # 4,500 steps stopped while adherence still climbed: decoder-alone 66 / 58% against 70 /
    # 69% (benchmarks/RESULTS.md, sessions 7, 12 and 13).
    # lr 1e-2, not 5e-3: the decoder learned the condition much sooner (decoder-alone
    # adherence 43 / 41% against 26 / 26% at step 3,000; benchmarks/RESULTS.md, session 7).
    c.decoder = _common("gan", total_steps=7000, global_batch=64, lr=1e-2, ema_decay=0.995)
    c.decoder.optim.b1 = 0.0  # StyleGAN2's Adam betas (0, 0.99)
    # optim.restart_steps = R (with restart_lr) makes the last R steps a warm restart; with
    # data.oversample and oversample_from = total_steps - R a final phase inside this run
    # (session 27: 600 steps from 7,000, seen / held-out 80.5 / 79.7%, against 84.0 / 81.5%
    # for the same 600 steps as a fresh fine-tune, the refine stage's way).
    # 32 px, not 64: decoder.data.image_size=64 with channels (64, 64, 32, 16, 8) and
    # d_resolution=32 (the CLIP reads the pictures box-downsampled) took the decoder stage 101
    # minutes instead of 62 and the whole pipeline to the two-hour line, for one-object
    # adherence 72.3 / 71.0% against 70.0 / 72.8%, small stars still blobs at 14 px (0%);
    # FID read at 32 px 65.6 against 83.0 (benchmarks/RESULTS.md, session 24).
    # mapping_lr_mul 1, not StyleGAN's 0.01: on a budget of ~150k images the slow mapping
    # network left the decoder drawing backgrounds only (L1 0.18 vs 0.10 after 500 steps).
    c.decoder.model = dict(z_dim=32, w_dim=128, mapping_layers=2, mapping_lr_mul=1.0,
                           input_from_w=True,
                           channels=(64, 64, 32, 16), d_channels=(16, 32, 64, 128),
                           noise=True, cross_attention_res=(), condition="image",
                           upsample="nearest", input_res=4, synthesis="style")
    # R1 is off here: its double backward through the discriminator costs ~40 ordinary steps on
    # this CPU, and the L1 term already keeps the game from drifting. r1_gamma > 0 turns it on.
    # At lr 5e-3 the full-strength adversarial game threw the L1 back up (0.11 -> 0.27 within
    # 40 steps); a tenth of it leaves the decoder led by reconstruction, sharpened by D.
    # perceptual_weight > 0 adds a distance on the frozen CLIP tower's feature maps (no gain in
    # a 500-step probe; benchmarks/RESULTS.md, session 7); reconstruction_shift = s > 0 takes
    # the squared error at the best of the real picture's shifts by up to s px (no gain by step
    # 2,500 at s = 2, session 9; at s = 1 over this config's first 7,000 steps the pipeline's
    # one-object adherence 76.9 / 73.5% against 76.9 / 79.4%, edits 72.8% at 0.4 against
    # 68.3%, variations 77.6% against 80.1%, small stars still blobs; as a 600-step fine-tune
    # with the final phase's oversampling 86.0 / 82.3% against 84.0 / 81.5%: session 27);
    # reconstruction_blur = sigma > 0 takes it between the two pictures blurred by a Gaussian
    # of sigma px, leaving edges to D and CLIP (at sigma 1 the decoder drew textured objects
    # and trailed the shipped run, 42 / 35% against 49 / 43% at step 2,000; session 16).
    # clip_weight 5 adds CLIP guidance, 5 x (1 - cosine between the frozen CLIP's vector of the
    # drawn picture and the condition): the squared error barely tells a rounded square from a
    # circle, CLIP does. Decoder-alone adherence at step 4,500: 66 / 58% at weight 5, 59 / 58% at
    # 2, 45 / 42% without; the squared error unchanged (benchmarks/RESULTS.md, session 12).
    # matching_negatives="counterfactual" with decoder.data.minimal_pairs=True adds each scene's
    # other-shape counterfactual as a negative of the matching-aware term: held-out one-object
    # adherence 63.5 -> 68.9%, seen 68.1 -> 67.8%, but FID 81 -> 104 (benchmarks/RESULTS.md,
    # session 20); not yet the default.
    # reconstruction_samples = K > 1 takes each picture's squared error at the best of K draws
    # of z; in a 2,000-step fine-tune of the shipped generator z stayed unused (two draws of
    # one vector 0.8 levels apart of 255; benchmarks/RESULTS.md, session 21). With
    # reconstruction_search the K draws are made without gradients and every term is taken at
    # each picture's nearest (implicit maximum likelihood), so K costs K - 1 forward passes:
    # from scratch at K = 8 the pipeline's one-object adherence is 72.6 / 71.5% (70.0 / 72.8%
    # at K = 1), variations keep colour and shape 80.1% of 400 x 4 (76.1%), small diamonds
    # 26% (0%), FID 70.9 (83.0); the decoder stage took 95 minutes here against 62, at 1.2-1.7x
    # the step time (benchmarks/RESULTS.md, session 25).
    # reconstruction_edge = 4 weights each pixel's squared error by 1 + 4 x the real picture's
    # largest step to a neighbour, scaled to mean 1 in each picture: the error moves to the
    # edges, where a star differs from a round blob that the frozen CLIP already takes for a
    # star (cosine 0.99). Decoder-alone adherence at step 3,000: 74 / 73% against 59 / 60%
    # unweighted; the whole pipeline's one-object adherence 70.0 / 72.8% against 68.1 / 63.5%,
    # large stars 95% against 67% (benchmarks/RESULTS.md, session 22).
    c.decoder.loss = dict(augment="", clip_weight=5.0, matching_weight=1.0, r1_gamma=0.0,
                          r1_interval=16, reconstruction="l2", reconstruction_weight=10.0,
                          reconstruction_edge=4.0, reconstruction_samples=8,
                          reconstruction_search=True, adversarial_weight=0.1,
                          perceptual_weight=0.0)
    c.decoder.eval_every = 500
    c.decoder.eval = dict(num_examples=300, use_ema=True)

    # The refine stage: 2,400 steps that fine-tune the decoder's generator (its EMA, with a new
    # discriminator and new Adam moments: `dalle_jax/train/stages.py`) at lr 3e-3 on batches
    # where one-object small stars and small diamonds, the kinds the decoder draws as blobs,
    # come 10 times as often (15 -> ~55% of pictures), from another data seed, with the squared
    # error taken at the best whole-pixel shift of the real picture (reconstruction_shift=1:
    # under the data's jitter the plain error's optimum blurs small stars; session 27). The
    # shipped pipeline against the 7,000 steps alone (1,000 eval captions): one object seen /
    # held-out 90.6 / 82.8% against 76.9 / 79.4%, small diamonds 96% against 19, small stars
    # 41% against 3, variations 86.7% against 80.1 (400 x 4), colour edits at 0.5 74.0%
    # against 67.5 (400 sources), FID 54.4 against 57.0 (session 29). 1,200 steps instead:
    # 88.3 / 83.5%, small stars 27%, variations 85.8%, edits 74.0%, FID 56.4; 600 steps: 84.7 /
    # 81.7%, small diamonds 74%, stars 16%, FID 61.2 (session 28; session 27's probe of those
    # 600 on another CPU, 86.0 / 82.3%). Without the shift 84.0 / 81.5% at 600; the 600 steps
    # as a final phase of the decoder's run instead (its Adam moments and discriminator kept)
    # 80.5 / 79.7% (benchmarks/RESULTS.md, session 27). Earlier, as that final phase: without
    # oversampling 74.9 / 71.7% against 72.6 / 71.5% with the flow prior (session 26); "small
    # star:20" alone 75.9 / 74.3% (stars do not learn from exposure here, diamonds do; sessions
    # 23 and 26); oversampling "small star:3,small diamond:3" over the whole run, 69.7 / 72.2%
    # against 70.0 / 72.8% (session 23).
    # refine.model.text_reader_layers, caption_to_w and cross_attention_res add layers that
    # read the caption (started as the identity), as DALL-E 2's decoder has a text encoder of
    # its own; with "two objects:3" or ":5" oversampled, 800-1,700 steps of them left
    # two-object prompts where they were (decoder alone 0.9-4.5%, the pipeline 0.3% after
    # 1,200 steps with the flattened caption into w) and the decoder all but deaf to the
    # order of the words: it does not yet commit to where two objects go, drawing two or three
    # blobs along the right row or column (benchmarks/RESULTS.md, session 31).
    # Its block holds what differs from the decoder's; every other field is the decoder's
    # (overrides of decoder.* reach it too), but where the parameters come from.
    c.refine = dict(total_steps=2400, optim=dict(lr=3e-3),
                    data=dict(seed=1, oversample="small star:10,small diamond:10"),
                    loss=dict(reconstruction_shift=1))
    return c
