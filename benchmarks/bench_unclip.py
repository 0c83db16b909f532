"""unCLIP diffusion speed: training throughput of the diffusion prior and decoder, and sampling
throughput of each at several step counts, on shapes-size models (CLIP tiny, 32 px).

    python benchmarks/bench_unclip.py [--steps 5] [--batch 16] [--decoder-steps 25,50,250]
                                      [--size shapes|tiny]

Training FLOPs come from XLA's cost analysis of the compiled step (forward, backward, the
frozen CLIP's forward, the optimizer), as in bench_gan.py; the denoiser's FLOPs per image from
one compiled forward pass at batch 1. Sampling is timed after compilation, with classifier-free
guidance (the model runs on 2B rows per step), from random weights: speed does not depend on
what the weights are. `--size tiny` runs the test suite's micro models, for a quick check.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench_clip import compiled_flops, cpu_name, matmul_peak_gflops
from dalle_jax import host
from dalle_jax import sharding
from dalle_jax.train import clip as clip_family
from dalle_jax.train import loop, unclip

SIZES = {
    # CLIP variant, image size, prior model, decoder model, prior batch, decoder batch
    "shapes": ("tiny", 32, dict(width=256, depth=4, num_heads=4), dict(), 256, 64),
    "tiny": ("micro", 16, dict(width=32, depth=1, num_heads=2),
             dict(base_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_heads=2,
                  norm_groups=4, context_dim=16), 32, 16),
}


def stage_config(family: str, model: dict, image_size: int, batch: int):
    return ml_collections.ConfigDict(dict(
        family=family, seed=0, total_steps=100,
        data=dict(name="shapes", split="train", seed=0, image_size=image_size, context_length=16,
                  global_batch=batch, num_threads=2, hard_negatives=0),
        model=model,
        optim=dict(lr=1e-4, warmup_steps=10, final_lr_fraction=0.1, weight_decay=0.0, b1=0.9,
                   b2=0.99, eps=1e-8, clip_norm=1.0, ema_decay=0.999),
        dtype="float32", remat=False, grad_accum_steps=1, mesh=dict(data=-1, fsdp=1),
        sharding=dict(params="replicate", rules=[]), log_every=10, eval_every=0,
        eval=dict(num_examples=0, use_ema=True), checkpoint_every=1000, keep_checkpoints=1,
        progress_bar=False))


def timed(fn, reps: int) -> float:
    """Median seconds of `fn()` (blocked on its result) over `reps` runs after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_training(task, config, steps: int):
    with tempfile.TemporaryDirectory() as workdir:
        mesh, task, step_fn, state, iterator, ckpt = loop.setup(config, workdir, task)
        batch = sharding.global_batch(next(iterator), mesh)
        frozen = jax.device_put(task.frozen, sharding.replicated(mesh))
        flops = compiled_flops(step_fn.lower(state, batch, frozen).compile())
        params = sum(x.size for x in jax.tree.leaves(state.params))
        holder = {"state": state}

        def step():
            holder["state"], metrics = step_fn(holder["state"], batch, frozen)
            return metrics
        seconds = timed(step, steps)
        ckpt.close()
    b = config.data.global_batch
    return dict(batch=b, params=params, step_s=seconds, images_per_s=b / seconds,
                gflops_per_image=flops / b / 1e9, gflops_per_s=flops / seconds / 1e9)


def forward_gflops(apply, *args) -> float:
    return compiled_flops(jax.jit(apply).lower(*args).compile()) / 1e9


def main():
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--batch", type=int, default=16, help="pictures per sampling call")
    parser.add_argument("--decoder-steps", default="25,50,250")
    parser.add_argument("--prior-steps", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--size", choices=sorted(SIZES), default="shapes")
    args = parser.parse_args()
    variant, image_size, prior_model, decoder_model, prior_batch, decoder_batch = SIZES[args.size]
    clip_config = ml_collections.ConfigDict(dict(
        model=dict(variant=variant), data=dict(image_size=image_size, context_length=16),
        remat=False, dtype="float32"))
    clip_params = jax.jit(clip_family.CLIPTask(clip_config).init_params)(jax.random.PRNGKey(0))

    cpu = cpu_name()
    print(f"# {args.size} models on {jax.device_count()} x {jax.devices()[0].platform} ({cpu}, "
          f"{os.cpu_count()} cores); float32 matmul peak {matmul_peak_gflops():.0f} GFLOP/s")

    prior_cfg = stage_config("diffusion_prior", prior_model, image_size, prior_batch)
    decoder_cfg = stage_config("diffusion_decoder", decoder_model, image_size, decoder_batch)
    prior_task = unclip.DiffusionPriorTask(prior_cfg, clip_params, clip_config)
    decoder_task = unclip.DiffusionDecoderTask(decoder_cfg, clip_params, clip_config)
    for name, task, cfg in (("prior", prior_task, prior_cfg), ("decoder", decoder_task,
                                                               decoder_cfg)):
        r = bench_training(task, cfg, args.steps)
        print(f"train {name:8s} batch {r['batch']:4d}  params {r['params'] / 1e6:6.2f}M  "
              f"step {r['step_s'] * 1e3:8.1f} ms  {r['images_per_s']:8.1f} images/s  "
              f"{r['gflops_per_image']:6.2f} GFLOP/image  {r['gflops_per_s']:6.1f} GFLOP/s")

    b = args.batch
    keys = jax.random.split(jax.random.PRNGKey(1), b)
    prior_params = jax.jit(prior_task.init_params)(jax.random.PRNGKey(2))
    decoder_params = jax.jit(decoder_task.init_params)(jax.random.PRNGKey(3))
    cc = prior_task.clip_model.config
    text_embed = jnp.ones((b, cc.embed_dim)) / np.sqrt(cc.embed_dim)
    feats = jnp.zeros((b, 16, cc.text_width))
    mask = jnp.ones((b, 16), bool)

    pc = prior_task.model.config
    g = forward_gflops(lambda p, *a: prior_task.model.apply({"params": p}, *a),
                       prior_params["net"], text_embed[:1], jnp.ones((1,)), text_embed[:1],
                       feats[:1], mask[:1], jnp.zeros((1,), bool))
    t = timed(lambda: prior_task.sample_prior(prior_params, text_embed, feats, mask, keys,
                                              args.prior_steps, args.guidance), 3)
    print(f"sample prior    {args.prior_steps:4d} steps x {b} (2 candidates, guided)  "
          f"{b / t:8.2f} embeddings/s  ({g * 1e3:.1f} MFLOP per forward per row; "
          f"{pc.width} wide, {pc.depth} deep)")

    dc = decoder_task.model.config
    s = dc.image_size
    g = forward_gflops(lambda p, *a: decoder_task.model.apply({"params": p}, *a),
                       decoder_params, jnp.zeros((1, s, s, 3)), jnp.ones((1,)), text_embed[:1],
                       feats[:1], mask[:1], jnp.zeros((1,), bool), jnp.zeros((1,), bool))
    n = sum(x.size for x in jax.tree.leaves(decoder_params))
    print(f"# decoder U-Net: {n / 1e6:.2f}M parameters, {g:.3f} GFLOP per image per forward")
    for steps in (int(x) for x in args.decoder_steps.split(",")):
        t = timed(lambda: decoder_task.sample_decoder(decoder_params, text_embed, feats, mask,
                                                      keys, steps, args.guidance), 1)
        print(f"sample decoder  {steps:4d} steps x {b} (DDIM, guided)  {b / t:8.2f} images/s  "
              f"({t:.1f} s per call, {2 * steps * g / (t / b):.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
