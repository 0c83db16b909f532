"""The PyTorch peers of benchmarks/bench_peers.py (issue 5): each peer's training step (and the
DALLE2-pytorch decoder's sampling) timed on this CPU with PyTorch held to the same threads.

Runs inside benchmarks/peers/.venv (made by setup_venv.sh), never in the project's environment:

    benchmarks/peers/.venv/bin/python benchmarks/peers/torch_side.py --which gigagan
    benchmarks/peers/.venv/bin/python benchmarks/peers/torch_side.py '{"which": "unet", ...}'

The JSON spec (bench_peers.py writes it) holds `which` (gigagan, unet, prior, clip), `batch`,
`steps` (timed steps after `warmup`), `threads` and `model` (the peer's size knobs, merged over
the defaults below); `sample_batch`, `sample_steps`, `guidance` (and `sample_reps`,
`sample_warmup`) add a sampling row for the unet: DDIM with classifier-free guidance, as its
Decoder samples; `autocast` ("bfloat16") runs the training step under `torch.autocast("cpu")`.
Prints one JSON line per measurement: parameters, FLOPs per image (counted by
torch.utils.flop_counter.FlopCounterMode over one whole step: matmuls, convolutions and
attention, forward and backward; elementwise work is not counted; two gaps in its table are
filled, see CUSTOM_FLOPS), the median step time and images/s.

Each training step is the peer's own loss (its library's training forward where it has one:
DALLE2-pytorch's `Decoder` and `DiffusionPrior`, open_clip's `ClipLoss`; gigagan-pytorch's
`GigaGAN` wraps accelerate, so its generator and discriminator are stepped here the way its
`train_step` does, with the discriminator frozen in the generator's step), then Adam with
gradient clipping and an EMA of the weights, as the project's step does.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

DEFAULTS = {
    # gigagan-pytorch: 32 px, unconditional (text conditioning off), no attention, one
    # convolution kernel per layer (the adaptive kernel bank selects among text-chosen kernels),
    # single-scale discriminator (no multiscale inputs, no auxiliary reconstruction).
    "gigagan": dict(dim_capacity=8, dim_max=512, dim_latent=128, style_dim=128, style_depth=2,
                    num_conv_kernels=1, d_dim_capacity=8, d_dim_max=512),
    # DALLE2-pytorch Unet as its Decoder trains it: image embedding and text encodings as
    # conditions, classifier-free dropout 0.1 / 0.5, eps prediction, fixed variance.
    "unet": dict(dim=32, dim_mults=(1, 2, 2), num_resnet_blocks=1, cond_dim=64,
                 attn_heads=4, attn_dim_head=16, self_attn=(False, False, False), embed_dim=128,
                 text_dim=128, text_len=16, resnet_groups=8),
    # DALLE2-pytorch DiffusionPriorNetwork in its DiffusionPrior (x0 prediction, cosine).
    "prior": dict(dim=256, depth=4, heads=4, dim_head=64, ff_mult=4, text_len=16),
    # open_clip CLIP, a small custom config at 32 px.
    "clip": dict(embed_dim=128, image_size=32, patch_size=4, vision_width=128,
                 vision_layers=3, vision_heads=4, text_width=128, text_layers=3, text_heads=4,
                 context_length=16, vocab_size=49408),
}


class Peer:
    """A peer model: its trained modules, one training step, a batch of random inputs."""

    package = ""

    def __init__(self, model: dict, batch: int):
        self.m, self.batch = model, batch

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def step(self):
        raise NotImplementedError


def adam(params, lr=1e-4):
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)


def update(loss, module, opt, ema, clip_norm=10.0):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm, foreach=True)
    opt.step()
    ema.update()


class GigaGANPeer(Peer):
    package = "gigagan-pytorch"

    def __init__(self, model, batch):
        super().__init__(model, batch)
        from gigagan_pytorch import Discriminator, Generator
        m = model
        self.G = Generator(image_size=32, dim_capacity=m["dim_capacity"], dim_max=m["dim_max"],
                           dim_latent=m["dim_latent"],
                           style_network=dict(dim=m["style_dim"], depth=m["style_depth"]),
                           self_attn_resolutions=(), cross_attn_resolutions=(),
                           num_conv_kernels=m["num_conv_kernels"], unconditional=True)
        self.D = Discriminator(image_size=32, dim_capacity=m["d_dim_capacity"],
                               dim_max=m["d_dim_max"], attn_resolutions=(),
                               multiscale_input_resolutions=(), aux_recon_resolutions=(),
                               aux_recon_patch_dims=(), aux_recon_frac_patches=(),
                               num_conv_kernels=m["num_conv_kernels"], unconditional=True)
        self.opt_g, self.opt_d = adam(self.G.parameters()), adam(self.D.parameters())
        self.ema_g, self.ema_d = EMA(self.G), EMA(self.D)
        self.real = torch.rand(batch, 3, 32, 32) * 2 - 1

    def modules(self):
        return [self.G, self.D]

    def logits(self, images):
        return self.D(images, rgbs=[], return_multiscale_outputs=False,
                      calc_aux_loss=False)[0].flatten()

    def step(self):
        # Generator: non-saturating loss through a frozen discriminator (gigagan's
        # train_generator_step freezes D the same way).
        self.D.requires_grad_(False)
        fake = self.G(batch_size=self.batch)
        update(F.softplus(-self.logits(fake)).mean(), self.G, self.opt_g, self.ema_g)
        self.D.requires_grad_(True)
        fake = fake.detach()
        loss = F.softplus(self.logits(fake)).mean() + F.softplus(-self.logits(self.real)).mean()
        update(loss, self.D, self.opt_d, self.ema_d)


class UNetPeer(Peer):
    package = "dalle2-pytorch"

    def __init__(self, model, batch, sample_steps=None):
        super().__init__(model, batch)
        from dalle2_pytorch import Decoder, Unet
        m = model
        self.unet = Unet(dim=m["dim"], image_embed_dim=m["embed_dim"],
                         text_embed_dim=m["text_dim"], cond_dim=m["cond_dim"],
                         dim_mults=tuple(m["dim_mults"]), num_resnet_blocks=m["num_resnet_blocks"],
                         attn_heads=m["attn_heads"], attn_dim_head=m["attn_dim_head"],
                         resnet_groups=m["resnet_groups"], self_attn=tuple(m["self_attn"]),
                         cond_on_image_embeds=True,
                         cond_on_text_encodings=True, max_text_len=m["text_len"])
        self.decoder = Decoder(unet=self.unet, image_size=32, timesteps=1000,
                               sample_timesteps=sample_steps, image_cond_drop_prob=0.1,
                               text_cond_drop_prob=0.5, learned_variance=False,
                               beta_schedule="cosine", auto_normalize_img=False)
        self.opt, self.ema = adam(self.unet.parameters()), EMA(self.unet)
        self.images = torch.rand(batch, 3, 32, 32) * 2 - 1
        self.cond = self.conditions(batch)

    def conditions(self, b):
        embed = F.normalize(torch.randn(b, self.m["embed_dim"]), dim=-1)
        return dict(image_embed=embed, text_encodings=torch.randn(b, self.m["text_len"],
                                                                  self.m["text_dim"]))

    def modules(self):
        return [self.unet]

    def step(self):
        update(self.decoder(self.images, **self.cond), self.unet, self.opt, self.ema)

    def sample(self, b, guidance):
        return self.decoder.sample(**self.conditions(b), cond_scale=guidance)


class PriorPeer(Peer):
    package = "dalle2-pytorch"

    def __init__(self, model, batch):
        super().__init__(model, batch)
        from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork
        m = model
        self.net = DiffusionPriorNetwork(dim=m["dim"], depth=m["depth"], heads=m["heads"],
                                         dim_head=m["dim_head"], ff_mult=m["ff_mult"],
                                         num_timesteps=1000,
                                         max_text_len=m["text_len"])
        self.prior = DiffusionPrior(self.net, image_embed_dim=m["dim"], timesteps=1000,
                                    cond_drop_prob=0.1, condition_on_text_encodings=True)
        self.opt, self.ema = adam(self.net.parameters()), EMA(self.net)
        d, n = m["dim"], m["text_len"]
        self.inputs = dict(text_embed=F.normalize(torch.randn(batch, d), dim=-1),
                           image_embed=F.normalize(torch.randn(batch, d), dim=-1),
                           text_encodings=torch.randn(batch, n, d))

    def modules(self):
        return [self.net]

    def step(self):
        # DiffusionPrior.forward scales image_embed in place: hand it a copy each step.
        inputs = {k: v.clone() for k, v in self.inputs.items()}
        update(self.prior(**inputs), self.net, self.opt, self.ema)


class CLIPPeer(Peer):
    package = "open_clip_torch"

    def __init__(self, model, batch):
        super().__init__(model, batch)
        import open_clip
        m = model
        self.model = open_clip.CLIP(
            embed_dim=m["embed_dim"], quick_gelu=True,
            vision_cfg=dict(image_size=m["image_size"], patch_size=m["patch_size"],
                            width=m["vision_width"], layers=m["vision_layers"],
                            head_width=m["vision_width"] // m["vision_heads"]),
            text_cfg=dict(context_length=m["context_length"], vocab_size=m["vocab_size"],
                          width=m["text_width"], heads=m["text_heads"],
                          layers=m["text_layers"]))
        self.loss = open_clip.ClipLoss()
        self.opt, self.ema = adam(self.model.parameters()), EMA(self.model)
        s, n = m["image_size"], m["context_length"]
        self.images = torch.randn(batch, 3, s, s)
        self.tokens = torch.randint(1, m["vocab_size"] - 1, (batch, n))
        self.tokens[:, -1] = m["vocab_size"] - 1  # end of text, where open_clip pools (argmax)

    def modules(self):
        return [self.model]

    def step(self):
        image, text, scale = self.model(self.images, self.tokens)
        update(self.loss(image, text, scale), self.model, self.opt, self.ema)


PEERS = {"gigagan": GigaGANPeer, "unet": UNetPeer, "prior": PriorPeer, "clip": CLIPPeer}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
    """torch's conv_backward formula with the weight gradient of a grouped convolution counted
    once per group, not once per group for every group (the stock formula ignores groups there,
    so gigagan-pytorch's per-sample modulated convolutions, one group per sample, counted
    `batch` times their true cost). Every weight entry sums over N x H_out x W_out products."""
    transposed, output_mask = args[4], args[-1]
    flops = 0
    if output_mask[0]:
        flops += flop_counter.conv_flop_count(grad_out_shape, w_shape, out_shape[0],
                                              transposed=not transposed)
    if output_mask[1]:
        positions = x_shape[0] * math.prod(grad_out_shape[2:])
        flops += 2 * positions * math.prod(w_shape)
    return flops


# The CPU kernels of scaled_dot_product_attention (open_clip's attention on this machine) are
# missing from torch's table: count them with its formulas for the other kernels.
CUSTOM_FLOPS = {
    torch.ops.aten.convolution_backward: _conv_backward_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs:
        flop_counter.sdpa_backward_flop_count(g, q, k, v),
}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def median_time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(spec: dict) -> list[dict]:
    which = spec["which"]
    model = {**DEFAULTS[which], **spec.get("model", {})}
    batch, steps, warmup = spec.get("batch", 16), spec.get("steps", 5), spec.get("warmup", 2)
    kwargs = {"sample_steps": spec["sample_steps"]} if "sample_steps" in spec else {}
    peer = PEERS[which](model, batch, **kwargs)
    params = sum(p.numel() for mod in peer.modules() for p in mod.parameters())
    versions = {name: importlib.metadata.version(name) for name in ("torch", peer.package)}
    common = dict(which=which, package=peer.package, versions=versions,
                  threads=torch.get_num_threads(), params=params, model=model)
    step = peer.step
    if spec.get("autocast"):  # bench_peers.py --bf16: the step's matmuls in bf16
        def step(dtype=getattr(torch, spec["autocast"])):
            with torch.autocast("cpu", dtype=dtype):
                peer.step()
        common["autocast"] = spec["autocast"]
    # Count on a deep copy, so the timed model starts from the same weights and optimizer state.
    flops = count_flops(copy.deepcopy(peer).step)
    seconds = median_time(step, steps, warmup)
    rows = [dict(common, phase="train", batch=batch, step_s=seconds, images_per_s=batch / seconds,
                 flops_per_image=flops / batch)]
    if which == "unet" and spec.get("sample_batch"):
        b, guidance = spec["sample_batch"], spec.get("guidance", 3.0)
        embed = peer.conditions(1)
        forward = count_flops(lambda: peer.unet(torch.zeros(1, 3, 32, 32), torch.zeros(1).long(),
                                                **embed))
        seconds = median_time(lambda: peer.sample(b, guidance), spec.get("sample_reps", 1),
                              spec.get("sample_warmup", 1))
        rows.append(dict(common, phase="sample", batch=b, steps=spec["sample_steps"],
                         guidance=guidance, seconds=seconds, images_per_s=b / seconds,
                         forward_flops_per_image=forward))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="{}", help="JSON spec (see the docstring)")
    parser.add_argument("--which", choices=sorted(PEERS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        spec = json.loads(args.spec)
    except json.JSONDecodeError as e:
        sys.exit(f"torch_side.py: the spec is not JSON ({e})")
    if args.which:
        spec["which"] = args.which
    if spec.get("which") not in PEERS:
        sys.exit(f"torch_side.py: name a peer with --which or the spec's 'which': "
                 f"{', '.join(sorted(PEERS))}")
    threads = args.threads or spec.get("threads", 2)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for row in run(spec):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
