"""dalle_jax against the PyTorch implementations users know (issue 5), on the same CPU.

    bash benchmarks/peers/setup_venv.sh          # once: the peers' own virtual environment
    python benchmarks/bench_peers.py [--quick] [--only gan|unet|prior|clip|sampling]
                                     [--out FILE] [--profile gan|unet|prior|clip]
                                     [--threads 2] [--passive] [--peer-malloc default|keep]
                                     [--bf16]

Each pair is a dalle_jax model and a peer of matched size (parameters and FLOPs per image within
20%; both counts are printed): the shipped-size GAN decoder (generator + discriminator) against
gigagan-pytorch's, the shipped-size unCLIP U-Net decoder against DALLE2-pytorch's Unet, the
diffusion prior against DALLE2-pytorch's DiffusionPriorNetwork, a small CLIP against
open_clip's. Our side times the project's real train step (`state.make_train_step` with the
project's optimizer, jitted with a donated state) on the model's own loss, the conditions given
(no frozen CLIP in either side's step); the peer side is `benchmarks/peers/torch_side.py`, run by
the venv's Python in a subprocess after ours, one at a time, PyTorch held to 2 threads. Times are
medians after warm-up. Then sampling: the shipped GAN `Pipeline.generate` against the
shipped-size unCLIP decoder at 50 guided DDIM steps, and DALLE2-pytorch's Unet at the same size
and steps.

FLOPs: "GFLOP/image" counts what torch's FlopCounterMode counts on the peer side (matmuls,
convolutions and attention, forward and backward; elementwise work not counted), by walking our
step's jaxpr with the same rules, so the match and the GFLOP/s compare like with like. XLA's cost
analysis of our compiled step (as bench_gan.py, bench_unclip.py and bench_clip.py report it,
elementwise work included) is shown beside it. MFU is against the float32 matmul peak measured
at the start of the run.

`--bf16` times the pairs whose model has a compute dtype (the CLIP) in bfloat16 on both sides:
ours with `dtype="bfloat16"` (float32 parameters and optimizer, bf16 matmuls), the peer's step
under `torch.autocast("cpu", dtype=torch.bfloat16)`; MFU is then against the bf16 matmul peak.
On CPUs with AMX (Intel Sapphire Rapids and later) both sides' bf16 matmuls run on it.

On a machine busy with other work, PyTorch's OpenMP threads spin-wait for each other and ran
the peers about 10x slower than on an idle one (open_clip: 12 s a step with 2 threads, 0.8 s
with 1, 1.4 s with 2 and --passive, which sets OMP_WAIT_POLICY=PASSIVE for them); time on an
idle machine, and use --passive only to check a busy one.

With `XLA_FLAGS=--xla_force_host_platform_device_count=N` our step runs data-parallel over N
host devices (the batch split, parameters replicated, as train.py's default mesh does); the
peers keep their thread pool.

`--profile NAME` says where our step's time goes for one pair: the step split into forward,
backward and optimizer by timing the loss, its gradient and the whole step; and every matmul and
convolution of the step timed alone (same shapes, same dimension numbers), grouped, against
what is left (elementwise work, reductions, copies, dispatch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.interpreters import partial_eval as pe  # noqa: E402  (dce_jaxpr: no public API)

import bench_gan  # noqa: E402
import bench_unclip  # noqa: E402
from bench_clip import compiled_flops, cpu_name, matmul_peak_gflops  # noqa: E402
from dalle_jax import host  # noqa: E402
from dalle_jax import config as config_lib  # noqa: E402
from dalle_jax import sharding  # noqa: E402
from dalle_jax.models import prior as prior_lib  # noqa: E402
from dalle_jax.models import unet as unet_lib  # noqa: E402
from dalle_jax.train import clip as clip_family  # noqa: E402
from dalle_jax.train import gan as gan_family  # noqa: E402
from dalle_jax.train import optim  # noqa: E402
from dalle_jax.train import state as state_lib  # noqa: E402
from dalle_jax.train import unclip  # noqa: E402

VENV_PYTHON = ROOT / "benchmarks" / "peers" / ".venv" / "bin" / "python"
TORCH_SIDE = ROOT / "benchmarks" / "peers" / "torch_side.py"
SETUP = "bash benchmarks/peers/setup_venv.sh"
CONTEXT = 16  # caption tokens, as the shapes models use

# Each pair: our model's knobs, the peer's (torch_side.py DEFAULTS names them), the batch in
# (quick, full) runs, and the speed the issue asks of us (ours / peer images per second).
# Sizes were matched by the counts this script prints (see benchmarks/RESULTS.md).
PAIRS = {
    "gan": dict(
        title="GAN decoder G+D / gigagan-pytorch G+D", goal=2.0, batch=(16, 64),
        # The shipped decoder's architecture (configs/shapes_gan.py); the matching-aware
        # discriminator term off (the peer has none) and CLIP guidance off (the peer has no
        # frozen CLIP to run). Both steps train G and D once on the same losses; the peer's
        # (gigagan's train_*_step) runs D forward three times, ours twice: one pass over
        # the fakes serves both players (two vjps of one forward), so our step counts fewer
        # FLOPs per image than the peer's while the models match in size.
        ours=dict(),
        peer=dict(which="gigagan", model=dict(dim_capacity=8, dim_max=512, dim_latent=64,
                                              style_dim=128, style_depth=2, d_dim_capacity=12,
                                              d_dim_max=96))),
    "unet": dict(
        title="unCLIP U-Net decoder / DALLE2-pytorch Unet", goal=1.0, batch=(8, 64),
        ours=dict(),  # the shipped size: UNetConfig's defaults (bench_unclip's "shapes")
        # Its ResnetBlocks carry cross-attention and an extra block per stage, so fewer, wider
        # blocks match: attention at 16 and 8 px, one block per stage plus the extra.
        peer=dict(which="unet", model=dict(dim=40, dim_mults=(1, 1, 2), num_resnet_blocks=0,
                                           cond_dim=32, attn_heads=4, attn_dim_head=16,
                                           self_attn=(False, True, True)))),
    "prior": dict(
        title="diffusion prior / DALLE2-pytorch DiffusionPriorNetwork", goal=1.0,
        batch=(32, 256),
        ours=dict(width=256, depth=4, num_heads=4),  # bench_unclip's "shapes" prior
        # Its SwiGLU feed-forward at 3x width costs what our GELU MLP at 4x does.
        peer=dict(which="prior", model=dict(dim=256, depth=4, heads=4, dim_head=64, ff_mult=3))),
    "clip": dict(
        title="CLIP ViT 32px / open_clip CLIP", goal=1.0, batch=(32, 128),
        # CLIP tiny's towers without its convolutional stem (open_clip has none): 4 px patches.
        ours=dict(variant="micro,embed_dim=128,patch_size=4,vision_width=128,vision_layers=3,"
                          "vision_heads=4,text_width=128,text_layers=3,text_heads=4"),
        peer=dict(which="clip", model=dict(embed_dim=128, patch_size=4, vision_width=128,
                                           vision_layers=3, vision_heads=4, text_width=128,
                                           text_layers=3, text_heads=4))),
}
SAMPLING = dict(gan_batch=(16, 64), gan_reps=(2, 5), unet_batch=(4, 16), steps=50, guidance=3.0)


# Extra environment for the peers' processes: `--peer-malloc keep` gives them the allocator
# settings that DALLE_JAX_MALLOC=keep gives our side (dalle_jax/host.py).
PEER_ENV: dict[str, str] = {}


class PeersMissing(RuntimeError):
    """The peers' venv is absent. Its message is one line."""


# ----------------------------------------------------------------------------- FLOP counting

def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
    rhs_in = rhs.shape[dn.rhs_spec[1]]
    # A transposed (input-gradient) convolution of a strided one dilates its input with zeros:
    # count only the products with real entries, as torch's conv_backward formula does.
    dilation = float(np.prod(eqn.params.get("lhs_dilation") or (1,)))
    return 2.0 * np.prod(out.shape) * np.prod(rhs_spatial) * rhs_in / dilation


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = np.prod([lhs.shape[d] for d in lc])
    batch = np.prod([lhs.shape[d] for d in lb])
    lfree = np.prod([s for d, s in enumerate(lhs.shape) if d not in (*lc, *lb)])
    rfree = np.prod([s for d, s in enumerate(rhs.shape) if d not in (*rc, *rb)])
    return 2.0 * batch * lfree * rfree * contract


HEAVY = {"conv_general_dilated": _conv_flops, "dot_general": _dot_flops}


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def heavy_ops(jaxpr, times: float = 1.0):
    """(eqn, how many times it runs) for every matmul and convolution, nested calls included:
    a scan's body counts `length` times, a cond's costliest branch once."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in HEAVY:
            yield eqn, times
        elif name == "cond":
            branches = [list(heavy_ops(b.jaxpr, times)) for b in eqn.params["branches"]]
            yield from max(branches, key=lambda ops: sum(HEAVY[e.primitive.name](e) * n
                                                         for e, n in ops))
        else:
            inner = times * eqn.params.get("length", 1) if name == "scan" else times
            for sub in _subjaxprs(eqn):
                yield from heavy_ops(sub, inner)


def step_jaxpr(fn, *args):
    """The jaxpr of `fn(*args)` with dead code removed, as XLA removes it: a custom_vjp's
    backward (gan.conv2d's) computes a weight gradient even where the weight is a constant,
    such as the discriminator's weights in the generator's loss."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]


def model_flops(fn, *args) -> float:
    """Matmul and convolution FLOPs of `fn(*args)` (FlopCounterMode's rules)."""
    return float(sum(HEAVY[e.primitive.name](e) * n for e, n in heavy_ops(step_jaxpr(fn, *args))))


# ------------------------------------------------------------------------------- our models

class GivenConditionsGAN(gan_family.GANTask):
    """The GAN task with its conditions given in `frozen` rather than computed by a frozen CLIP:
    the step is the generator and discriminator alone, as the peer's is."""

    def conditions(self, given, images, tokens):
        del images
        return given["cond"], given["token_features"], tokens != 0


class GivenConditionsDiffusion:
    """A diffusion task whose grad_fn is the model's own loss on conditions held in the batch."""

    def __init__(self, model, init_params, loss):
        self.model, self.init_params, self.loss = model, init_params, loss

    def grad_fn(self, params, batch, rng, frozen, step):
        del frozen, step
        loss, grads = jax.value_and_grad(lambda p: self.loss(p, batch, rng))(params)
        return grads, {"loss": loss}


def _optim_config(**changes):
    return ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=10, final_lr_fraction=0.1,
                                          weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8,
                                          clip_norm=10.0, ema_decay=0.999) | changes)


def _clip_config(variant="tiny", dtype="float32"):
    return ml_collections.ConfigDict(dict(
        model=dict(variant=variant), data=dict(image_size=32, context_length=CONTEXT),
        remat=False, dtype=dtype, loss="softmax"))


def _conditions(b, embed=128, width=128, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    e = jax.random.normal(k1, (b, embed))
    return (e / jnp.linalg.norm(e, axis=-1, keepdims=True),
            jax.random.normal(k2, (b, CONTEXT, width)), jnp.ones((b, CONTEXT), bool))


def _images(b, seed=2):
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, 32, 32, 3), minval=-1.0, maxval=1.0)


def _tokens(b):
    tokens = np.random.default_rng(0).integers(1, 49406, (b, CONTEXT), dtype=np.int32)
    tokens[:, -1] = 49407  # end of text, where the text tower pools
    return jnp.asarray(tokens)


# The pairs whose model has a compute dtype, for --bf16.
BF16_PAIRS = ("clip",)


def build_ours(name: str, knobs: dict, b: int, dtype: str = "float32"):
    """(task, optimizer config, batch, frozen) for our side of a pair."""
    if dtype != "float32" and name not in BF16_PAIRS:
        raise ValueError(f"{name}: our model has no compute dtype; --bf16 applies to "
                         f"{', '.join(BF16_PAIRS)}")
    if name == "gan":
        # The best-of-K search over z (session 25) off too: the peer has no counterpart, and
        # this pair's figures since session 15 were measured with one draw.
        config = config_lib.load(bench_gan.CONFIG, [
            "decoder.loss.matching_weight=0.0", "decoder.loss.clip_weight=0.0",
            "decoder.loss.reconstruction_samples=1"] + [
            f"decoder.model.{k}={v!r}" for k, v in knobs.items()])
        stage = config.decoder
        task = GivenConditionsGAN(stage, None, config.clip)
        cond, features, _ = _conditions(b)
        frozen = {"clip": {"cond": cond, "token_features": features}}
        batch = {"image": _images(b), "tokens": _tokens(b)}
        return task, stage.optim, batch, frozen
    if name == "unet":
        stage = bench_unclip.stage_config("diffusion_decoder", knobs, 32, b)
        model = unclip.build_decoder(stage, clip_family.build_model(_clip_config()).config)
        embed, features, mask = _conditions(b)
        batch = {"image": _images(b), "embed": embed, "features": features, "mask": mask}
        task = GivenConditionsDiffusion(
            model, lambda rng: unet_lib.init(model, rng, CONTEXT),
            lambda p, bt, rng: unet_lib.diffusion_loss(model, p, bt["image"], bt["embed"],
                                                       bt["features"], bt["mask"], rng))
        return task, _optim_config(), batch, None
    if name == "prior":
        stage = bench_unclip.stage_config("diffusion_prior", knobs, 32, b)
        model = unclip.build_prior(stage, clip_family.build_model(_clip_config()).config)
        image_embed, features, mask = _conditions(b)
        text_embed = _conditions(b, seed=3)[0]
        batch = {"image_embed": image_embed, "text_embed": text_embed, "features": features,
                 "mask": mask}
        task = GivenConditionsDiffusion(
            model, lambda rng: prior_lib.init(model, rng, CONTEXT),
            lambda p, bt, rng: prior_lib.diffusion_loss(model, p, bt["image_embed"],
                                                        bt["text_embed"], bt["features"],
                                                        bt["mask"], rng))
        return task, _optim_config(), batch, None
    if name == "clip":
        task = clip_family.CLIPTask(_clip_config(knobs["variant"], dtype))
        batch = {"image": _images(b), "tokens": _tokens(b)}
        return task, _optim_config(weight_decay=0.05), batch, None
    raise ValueError(f"unknown pair {name!r}; valid: {', '.join(PAIRS)}")


def jitted_step(task, optim_config):
    tx, schedule = optim.make_optimizer(optim_config, 1000)
    step = jax.jit(state_lib.make_train_step(task.grad_fn, tx, schedule, optim_config.ema_decay),
                   donate_argnums=(0,))
    init = jax.jit(lambda rng: state_lib.create(task.init_params(rng), tx, rng))
    return step, init(jax.random.PRNGKey(0))


def spread(tree, b: int):
    """The project's data parallelism when there is more than one device: every leaf whose
    leading axis is the batch split over a ("data",) mesh of all devices, the rest replicated.
    On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=N` makes N devices of its cores,
    as train.py's mesh would use them."""
    if jax.device_count() == 1 or tree is None:
        return tree
    mesh = sharding.make_mesh()
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh) if x.shape[:1] == (b,)
                                   else sharding.replicated(mesh))
    return jax.tree.map(put, tree)


def bench_ours(name: str, b: int, reps: int, dtype: str = "float32") -> dict:
    task, optim_config, batch, frozen = build_ours(name, PAIRS[name]["ours"], b, dtype)
    step, state = jitted_step(task, optim_config)
    if jax.device_count() > 1:
        state = jax.device_put(state, sharding.replicated(sharding.make_mesh()))
        batch, frozen = spread(batch, b), spread(frozen, b)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    flops = model_flops(step, state, batch, frozen)
    # cost_analysis counts one device's share of a data-parallel step
    xla = compiled_flops(step.lower(state, batch, frozen).compile()) * jax.device_count()
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch, frozen)
        return metrics
    seconds = bench_unclip.timed(run, reps)
    return dict(params=params, flops_per_image=flops / b, xla_flops_per_image=xla / b,
                step_s=seconds, images_per_s=b / seconds, batch=b)


# ------------------------------------------------------------------------------- the peers

def run_peer(spec: dict, timeout: float = 1800, passive: bool = False) -> list[dict]:
    if not VENV_PYTHON.exists():
        raise PeersMissing(f"the peers' venv is missing ({VENV_PYTHON.relative_to(ROOT)}); "
                           f"make it with: {SETUP}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(OMP_NUM_THREADS=str(spec.get("threads", 2)),
               MKL_NUM_THREADS=str(spec.get("threads", 2)))
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(PEER_ENV)
    proc = subprocess.run([str(VENV_PYTHON), str(TORCH_SIDE), json.dumps(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RuntimeError(f"torch_side.py {spec['which']} failed: {last}")
    return rows


# ------------------------------------------------------------------------------- sampling

def bench_sampling_all(q: int, report, threads: int = 2, passive: bool = False) -> None:
    b = SAMPLING["gan_batch"][q]
    gan = bench_gan.bench_sampling(None, b, SAMPLING["gan_reps"][q])
    report.sampling.append(("GAN Pipeline.generate (shipped; prompt -> CLIP -> prior -> "
                            "generator)", b, "1 forward", gan["images_per_s"]))
    b, steps, guidance = SAMPLING["unet_batch"][q], SAMPLING["steps"], SAMPLING["guidance"]
    clip_config = _clip_config()
    clip_params = jax.jit(clip_family.CLIPTask(clip_config).init_params)(jax.random.PRNGKey(0))
    stage = bench_unclip.stage_config("diffusion_decoder", PAIRS["unet"]["ours"], 32, b)
    task = unclip.DiffusionDecoderTask(stage, clip_params, clip_config)
    params = jax.jit(task.init_params)(jax.random.PRNGKey(3))
    embed, features, mask = _conditions(b)
    keys = jax.random.split(jax.random.PRNGKey(1), b)
    t = bench_unclip.timed(lambda: task.sample_decoder(params, embed, features, mask, keys,
                                                       steps, guidance), 1)
    report.sampling.append((f"unCLIP U-Net decoder (shipped size), DDIM {steps}, guided", b,
                            f"{2 * steps} forwards", b / t))
    report.gan_vs_unclip = gan["images_per_s"] / (b / t)
    report.write()
    spec = dict(PAIRS["unet"]["peer"], batch=2, steps=1, warmup=0, sample_batch=b,
                sample_steps=steps, guidance=guidance, threads=threads, sample_warmup=q)
    row = run_peer(spec, passive=passive)[-1]
    report.sampling.append((f"DALLE2-pytorch Unet (matched size), DDIM {steps}, guided", b,
                            f"{2 * steps} forwards", row["images_per_s"]))
    report.unclip_vs_peer = (b / t) / row["images_per_s"]


# ------------------------------------------------------------------------------- the report

class Report:
    def __init__(self, header: list[str], peak: float, out: str | None):
        self.header, self.peak, self.out = header, peak, out
        self.pairs, self.sampling, self.notes = [], [], []
        self.gan_vs_unclip = self.unclip_vs_peer = None

    def pair_line(self, name: str, o: dict, p: dict) -> str:
        pair = PAIRS[name]
        ratio = o["images_per_s"] / p["images_per_s"]
        mark = "met" if ratio >= pair["goal"] else "short"
        g = lambda r: r["flops_per_image"] * r["images_per_s"] / 1e9
        return (f"| {pair['title']} | {o['batch']} | {o['params'] / 1e6:.2f}M / "
                f"{p['params'] / 1e6:.2f}M ({o['params'] / p['params'] - 1:+.0%}) | "
                f"{o['flops_per_image'] / 1e9:.3f} / {p['flops_per_image'] / 1e9:.3f} "
                f"({o['flops_per_image'] / p['flops_per_image'] - 1:+.0%}; XLA "
                f"{o['xla_flops_per_image'] / 1e9:.3f}) | {o['step_s']:.4g} / {p['step_s']:.4g} | "
                f"{o['images_per_s']:.4g} / {p['images_per_s']:.4g} | {g(o):.1f} / {g(p):.1f} | "
                f"{g(o) / self.peak:.0%} / {g(p) / self.peak:.0%} | "
                f"**{ratio:.2f}x** (>= {pair['goal']:g}x: {mark}) |")

    def markdown(self) -> str:
        lines = list(self.header) + [
            "", "| pair | batch | params ours / peer | GFLOP/image ours / peer (XLA, ours) | "
            "step s ours / peer | images/s ours / peer | GFLOP/s ours / peer | "
            "MFU ours / peer | speed ours/peer (goal) |",
            "|---|---:|---|---|---|---|---|---|---|"]
        lines += [self.pair_line(*row) for row in self.pairs]
        if self.sampling:
            lines += ["", "| sampling | batch | network passes per picture | images/s |",
                      "|---|---:|---|---:|"]
            lines += [f"| {n} | {b} | {f} | {r:.4g} |" for n, b, f, r in self.sampling]
            if self.gan_vs_unclip:
                lines.append(f"\nGAN / unCLIP decoder at {SAMPLING['steps']} steps: "
                             f"**{self.gan_vs_unclip:.0f}x** images/s (goal >= 100x: "
                             f"{'met' if self.gan_vs_unclip >= 100 else 'short'}).")
            if self.unclip_vs_peer:
                lines.append(f"Our unCLIP decoder / DALLE2-pytorch Unet sampling: "
                             f"**{self.unclip_vs_peer:.2f}x** images/s.")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self):
        if self.out:
            Path(self.out).write_text(self.markdown())


def header(peak: float, args, versions: dict) -> list[str]:
    cpu = cpu_name()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    peers = ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "not run"
    precision = "bfloat16" if args.bf16 else "float32"
    return [f"# dalle_jax vs PyTorch peers ({'quick' if args.quick else 'full'}"
            f"{', bf16 compute' if args.bf16 else ''})", "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {cpu}, "
            f"{os.cpu_count()} CPUs; jax {jax.__version__} ({jax.device_count()} x "
            f"{jax.devices()[0].platform}); peers: {peers}, {args.threads} threads"
            f"{' (OMP_WAIT_POLICY=PASSIVE)' if args.passive else ''}; allocator: ours "
            f"{'kept (DALLE_JAX_MALLOC=keep)' if host.kept() else 'glibc defaults'}, "
            f"the peers' {'kept (--peer-malloc keep)' if PEER_ENV else 'glibc defaults'}.", "",
            f"{precision} matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s. GFLOP counts "
            "matmuls, convolutions and attention (torch FlopCounterMode's rules, forward + "
            "backward); XLA's count of our step adds elementwise work."]


# ------------------------------------------------------------------------------- profiling

def _time(fn, reps: int) -> float:
    return bench_unclip.timed(fn, reps)


def _op_label(eqn) -> str:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    if eqn.primitive.name == "dot_general":
        return f"dot {lhs} x {rhs}"
    p = eqn.params
    tag = "conv"
    if any(d != 1 for d in p.get("lhs_dilation") or ()):
        tag = "conv (input grad of strided)"
    elif any(d != 1 for d in p.get("rhs_dilation") or ()) or any(
            s != 1 for s in p["window_strides"]):
        tag = "conv strided/dilated"
    if p.get("feature_group_count", 1) > 1 or p.get("batch_group_count", 1) > 1:
        tag += " grouped"
    return f"{tag} {lhs} * {rhs}"


def profile(name: str, b: int, reps: int):
    """Prints where our step's time goes: forward / backward / optimizer, then each matmul and
    convolution of the step timed alone, against the whole step."""
    task, optim_config, batch, frozen = build_ours(name, PAIRS[name]["ours"], b)
    step, state = jitted_step(task, optim_config)
    params = jax.tree.map(jnp.copy, state.params)  # the step donates the state's own
    rng = jax.random.PRNGKey(5)
    zero = jnp.zeros((), jnp.int32)
    grads = jax.jit(lambda p: task.grad_fn(p, batch, rng, frozen, zero))
    holder = {"state": state}

    def full():
        holder["state"], m = step(holder["state"], batch, frozen)
        return m
    t_step = _time(full, reps)
    t_grad = _time(lambda: grads(params), reps)
    # The forward alone: the loss of the same function with gradients stopped at the output.
    if name == "gan":
        # Both players' losses forward: G, then D once on the fakes (the step shares that
        # pass between the players) and once on the real batch.
        def forward(p):
            fake = task.generator.apply({"params": p["generator"]},
                                        jnp.zeros((b, task.gan_config.z_dim)),
                                        frozen["clip"]["cond"], rng)
            d = lambda x: task.discriminator.apply({"params": p["discriminator"]}, x,
                                                   frozen["clip"]["cond"])
            return d(fake).sum() + d(batch["image"]).sum()
    elif name == "clip":
        forward = lambda p: task.loss_fn(p, batch, rng, frozen)[0]
    else:
        forward = lambda p: task.loss(p, batch, rng)
    t_fwd = _time(lambda: jax.jit(forward)(params), reps)
    print(f"\n## Where the time goes: {PAIRS[name]['title']} (ours), batch {b}\n")
    print("| part | ms | share of step |\n|---|---:|---:|")
    for part, t in (("forward (loss)", t_fwd), ("backward (gradient - forward)", t_grad - t_fwd),
                    ("optimizer, EMA, health metrics (step - gradient)", t_step - t_grad),
                    ("whole step", t_step)):
        print(f"| {part} | {t * 1e3:.1f} | {t / t_step:.0%} |")

    jaxpr = step_jaxpr(step, state, batch, frozen)
    groups = collections.defaultdict(lambda: [0.0, 0.0, 0, None])  # flops, time, count, eqn
    for eqn, n in heavy_ops(jaxpr):
        g = groups[_op_label(eqn)]
        g[0] += HEAVY[eqn.primitive.name](eqn) * n
        g[2] += n
        g[3] = eqn
    rows = []
    for label, (flops, _, count, eqn) in groups.items():
        args = [jax.random.normal(jax.random.PRNGKey(i), v.aval.shape, v.aval.dtype)
                for i, v in enumerate(eqn.invars)]
        fn = jax.jit(lambda *a, eqn=eqn: eqn.primitive.bind(*a, **eqn.params))
        t = _time(lambda: fn(*args), max(3, reps)) * count
        rows.append((t, flops, count, label))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\nEach matmul and convolution of the step timed alone ({len(rows)} kinds), "
          f"slowest first:\n")
    print("| op (shapes) | times per step | ms per step | GFLOP/s | share of step |")
    print("|---|---:|---:|---:|---:|")
    for t, flops, count, label in rows[:15]:
        print(f"| {label} | {count:g} | {t * 1e3:.2f} | {flops / t / 1e9:.1f} | "
              f"{t / t_step:.0%} |")
    flops = sum(r[1] for r in rows)
    print(f"| all {len(rows)} kinds | | {total * 1e3:.1f} | {flops / total / 1e9:.1f} | "
          f"{total / t_step:.0%} |")
    print(f"| the rest: elementwise, norms, reductions, copies, dispatch | | "
          f"{(t_step - total) * 1e3:.1f} | | {(t_step - total) / t_step:.0%} |")


# ------------------------------------------------------------------------------- main

def main(argv=None):
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few steps")
    parser.add_argument("--only", nargs="+", choices=[*PAIRS, "sampling"],
                        help="run only these pairs (and/or the sampling comparison)")
    parser.add_argument("--out", help="write the markdown table here too")
    parser.add_argument("--profile", choices=list(PAIRS),
                        help="only say where our step's time goes for this pair")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (default 2)")
    parser.add_argument("--passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE for the peers: on a machine busy with "
                             "other work, OpenMP's spinning threads ran them ~10x slower")
    parser.add_argument("--peer-malloc", choices=("default", "keep"), default="default",
                        help="glibc's allocator for the peers: its defaults, or the settings "
                             "that DALLE_JAX_MALLOC=keep gives our side (dalle_jax/host.py)")
    parser.add_argument("--bf16", action="store_true",
                        help=f"bfloat16 compute on both sides, for the pairs whose model has a "
                             f"compute dtype ({', '.join(BF16_PAIRS)}); the others are skipped")
    parser.add_argument("--cache", default=str(ROOT / ".jax_cache"),
                        help="persistent compilation cache ('' for none)")
    args = parser.parse_args(argv)
    if args.peer_malloc == "keep":
        PEER_ENV.update(host.ENVIRONMENT)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: its directory does not exist")
    q = 0 if args.quick else 1
    reps = (2, 5)[q]
    if args.profile:
        profile(args.profile, PAIRS[args.profile]["batch"][q], reps)
        return
    if not VENV_PYTHON.exists():
        sys.exit(f"bench_peers.py: the peers' venv is missing "
                 f"({VENV_PYTHON.relative_to(ROOT)}); make it with: {SETUP}")
    start = time.perf_counter()
    dtype = "bfloat16" if args.bf16 else "float32"
    peak = matmul_peak_gflops(dtype=getattr(jnp, dtype))
    versions = {}
    report = Report(header(peak, args, versions), peak, args.out)
    for name in PAIRS:
        if args.only and name not in args.only:
            continue
        pair, b = PAIRS[name], PAIRS[name]["batch"][q]
        if args.bf16 and name not in BF16_PAIRS:
            report.notes.append(f"{name}: skipped under --bf16 (our model has no compute dtype)")
            continue
        try:
            ours = bench_ours(name, b, reps, dtype)
            peer = run_peer(dict(pair["peer"], batch=b, steps=reps, warmup=(1, 2)[q],
                                 threads=args.threads, autocast=args.bf16 and dtype),
                            passive=args.passive)[0]
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            report.notes.append(f"{name}: failed ({str(e).splitlines()[0][:200]})")
            print(f"# {report.notes[-1]}", file=sys.stderr, flush=True)
            continue
        versions.update(peer["versions"])
        report.header = header(peak, args, versions)
        report.pairs.append((name, ours, peer))
        print(report.pair_line(name, ours, peer), flush=True)
        report.write()
    if (not args.only or "sampling" in args.only) and not args.bf16:
        try:
            bench_sampling_all(q, report, args.threads, args.passive)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            report.notes.append(f"sampling: failed ({str(e).splitlines()[0][:200]})")
    report.notes.append(f"whole run {time.perf_counter() - start:.0f} s, compilation included")
    report.write()
    print("\n" + report.markdown(), flush=True)


if __name__ == "__main__":
    main()
