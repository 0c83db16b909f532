"""Command lines: thin wrappers that parse arguments, call the library and turn every
expected failure into one clear line on stderr with a non-zero exit status."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    return status


def train_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a dalle_jax model. Rerun the same command to resume.",
        epilog="Any config field can be overridden as key.path=value, e.g. optim.lr=3e-4.")
    parser.add_argument("--config", required=True, help="a Python config file (configs/*.py)")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics go here")
    parser.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    args, overrides = parser.parse_known_args(argv)
    from dalle_jax import host
    host.from_environment()

    from dalle_jax import config as config_lib
    from dalle_jax.checkpoint import CheckpointError
    try:
        config = config_lib.load(args.config, overrides)
        config_lib.check_workdir(config, args.workdir)
    except config_lib.ConfigError as e:
        return _fail(str(e))
    if args.coordinator or args.num_processes:
        from dalle_jax import sharding
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from dalle_jax.train.loop import Preempted, TrainingError, stop_signals, train_and_evaluate
    try:
        # SIGTERM/SIGINT between stages, too, end in a checkpoint and Preempted.
        with stop_signals.catch():
            if config.family == "pipeline":
                from dalle_jax.train import stages
                stages.run(config, args.workdir)
            else:
                train_and_evaluate(config, args.workdir)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return 0
    except (CheckpointError, TrainingError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return 0


def sample_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sample.py", description="Draw pictures from a prompt with a trained dalle_jax "
        "model (the shipped one unless --checkpoint says otherwise) and write them as one grid "
        "PNG, whose path is printed.")
    parser.add_argument("prompt", nargs="*", help="what to draw (one or more prompts)")
    parser.add_argument("--num", type=int, default=4, help="pictures per prompt or image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png", help="the grid PNG to write")
    parser.add_argument("--checkpoint", help="a model file (workdir/model.npz of a training "
                        "run); default: the model shipped in the package")
    parser.add_argument("--generator", default="gan", choices=("gan", "unclip"),
                        help="gan (one pass per picture) or unclip (diffusion prior and "
                        "decoder, DALL-E 2's path)")
    add_sampling_options(parser)
    parser.add_argument("--rerank", type=int, default=1, metavar="K",
                        help="draw K candidates per picture and keep the one the model's CLIP "
                        "finds closest to the prompt (K times the work; default 1)")
    parser.add_argument("--scale", type=int, default=4, help="enlarge the grid this many times")
    parser.add_argument("--variations", metavar="IMG", help="re-draw this picture --num times")
    parser.add_argument("--interpolate", nargs=2, metavar="IMG",
                        help="--num pictures from the first image's vector to the second's")
    parser.add_argument("--edit", metavar="IMG", help="change this picture from --from to --to")
    parser.add_argument("--from", dest="from_text", metavar="TEXT")
    parser.add_argument("--to", dest="to_text", metavar="TEXT")
    parser.add_argument("--amount", type=float, default=0.5, help="how far an edit goes (0-1)")
    args = parser.parse_args(argv)
    from dalle_jax import host
    host.from_environment()
    modes = [m for m in ("variations", "interpolate", "edit") if getattr(args, m)]
    if len(modes) > 1:
        return _fail(f"choose one of --{' / --'.join(modes)}")
    if not modes and not args.prompt:
        return _fail('say what to draw, e.g. sample.py "a large red circle in the top left"')
    if modes and args.prompt:
        return _fail(f"--{modes[0]} takes no prompt (did you mean --from/--to?)")
    if args.edit and not (args.from_text and args.to_text):
        return _fail("--edit needs --from TEXT and --to TEXT")
    if args.num < 1 or args.num > 1024:
        return _fail(f"--num must be between 1 and 1024, not {args.num}")
    if not 1 <= args.rerank <= 64:
        return _fail(f"--rerank must be between 1 and 64, not {args.rerank}")
    if args.rerank > 1 and modes:
        return _fail(f"--rerank ranks pictures against a prompt; --{modes[0]} has none")
    if not 1 <= args.scale <= 32:
        return _fail(f"--scale must be between 1 and 32, not {args.scale}")
    if not 0.0 <= args.amount <= 1.0:
        return _fail(f"--amount must be between 0 and 1, not {args.amount}")
    try:
        options = sampling_options(args, args.generator)
    except ValueError as e:
        return _fail(str(e))
    prompts = [_clean_prompt(p) for p in args.prompt]
    from_text, to_text = (None if t is None else _clean_prompt(t)
                          for t in (args.from_text, args.to_text))
    problem = output_problem(args.out)
    if problem:  # before minutes of loading and drawing, and before anything is written
        return _fail(one_line(problem))

    import warnings
    from dalle_jax import bundle, images as images_lib
    from dalle_jax.pipeline import Pipeline, PromptError
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = Pipeline.load(args.checkpoint, generator=args.generator)
            try:  # what this model's prior takes (a GAN holds one of two)
                pipe.options(options)
            except ValueError as e:
                return _fail(one_line(str(e)))
            s = pipe.image_size
            if args.variations:
                pictures = pipe.variations(images_lib.load_image(args.variations, s), args.num,
                                           args.seed, **options)
                what = f"variations of {args.variations}"
            elif args.interpolate:
                a, b = (images_lib.load_image(p, s) for p in args.interpolate)
                pictures = pipe.interpolate(
                    a, b, max(args.num, 2), args.seed,
                    **{"decoder_steps" if k == "steps" else k: v for k, v in options.items()})
                what = f"interpolation {args.interpolate[0]} -> {args.interpolate[1]}"
            elif args.edit:
                source = images_lib.load_image(args.edit, s)
                edited = pipe.edit(source, from_text, to_text, args.amount, args.seed,
                                   **options)
                pictures = np.concatenate([source[None], edited])
                what = f"edit of {args.edit}: {from_text!r} -> {to_text!r}"
            else:
                pictures = pipe.generate(prompts, args.num, args.seed, rerank=args.rerank,
                                         **options)
                what = " | ".join(prompts)
        for w in caught:
            print(f"warning: {one_line(str(w.message))}", file=sys.stderr)
        cols = args.num if not (args.interpolate or args.edit) else len(pictures)
        metadata = {"prompt": what, "seed": args.seed, "model": pipe.path,
                    "generator": args.generator, **pipe.options(options)}
        if args.rerank > 1:
            metadata["rerank"] = args.rerank
        images_lib.save_png(args.out, images_lib.grid(pictures, cols=cols),
                            {k: _printable(str(v)) for k, v in metadata.items()},
                            scale=args.scale)
    except (bundle.BundleError, images_lib.ImageError, PromptError) as e:
        return _fail(one_line(str(e)))
    _print_path(args.out)
    return 0


# Each generator's sampling options as command-line flags (Pipeline's OPTIONS), shared by
# sample.py and the evaluation command: (option, type, help).
SAMPLING_FLAGS = (
    ("truncation", float, "GAN: 1 = full diversity (default); smaller pulls toward each "
     "prompt's mean style"),
    ("prior_temperature", float, "GAN with a flow prior: its starting noise scale (default 0.5; "
     "1 = full diversity, lower stays nearer each prompt's typical picture)"),
    ("layout_temperature", float, "GAN with a layout stage: its sampling temperature "
     "(default 1; 0 = each cell's likeliest class)"),
    ("layout_guidance", float, "GAN whose layout model reads the image vector and was trained "
     "with its caption sometimes dropped: classifier-free guidance on the caption (default 1 = "
     "none)"),
    ("steps", int, "unCLIP: decoder DDIM steps (default 50)"),
    ("guidance_scale", float, "unCLIP: decoder classifier-free guidance (default 3; 1 = none)"),
    ("eta", float, "unCLIP: DDIM eta, 0 deterministic, 1 ancestral (default 1)"),
    ("prior_steps", int, "a diffusion prior's DDIM steps (unCLIP: default 25; a GAN holding "
     "one: default 10)"),
    ("prior_guidance_scale", float, "a diffusion prior's classifier-free guidance (unCLIP, or a "
     "GAN holding one; default 1)"),
)


def add_sampling_options(parser: argparse.ArgumentParser):
    for name, kind, text in SAMPLING_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)


def sampling_options(args: argparse.Namespace, generator: str) -> dict:
    """The sampling options given on the command line, checked against `generator` before any
    model is loaded; ValueError with a one-line message otherwise."""
    from dalle_jax.pipeline import GENERATORS, OPTIONS
    options = {name: getattr(args, name) for name, _, _ in SAMPLING_FLAGS
               if getattr(args, name, None) is not None}
    for key in options:
        if key not in OPTIONS[generator]:
            raise ValueError(f"--{key.replace('_', '-')} is not an option of the {generator} "
                             "generator")
    GENERATORS[generator].check({**OPTIONS[generator], **options})
    return options


def _print_path(path: str):
    """Prints a path as its own bytes, whatever the terminal's encoding (a path from argv may
    hold surrogate escapes of bytes that are not UTF-8)."""
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        print(_printable(path))
        return
    sys.stdout.flush()
    out.write(os.fsencode(path) + b"\n")
    out.flush()


def output_problem(path: str) -> str | None:
    """Why a new file cannot be written at `path` (one line), or None. Missing directories are
    not created: a mistyped directory is more often a mistake than a wish."""
    if not path:
        return "cannot write an empty path"
    shown = _printable(path)
    if os.path.isdir(path):
        return f"cannot write {shown}: it is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        return f"cannot write {shown}: no directory {_printable(parent)}"
    if not os.path.isdir(parent):
        return f"cannot write {shown}: {_printable(parent)} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {shown}: permission denied in {_printable(parent)}"
    return None


def _printable(text: str) -> str:
    """Text as it can be shown and stored in UTF-8: surrogate escapes of undecodable bytes (in
    paths and arguments) become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates that are no escaped bytes
        return text.encode("utf-8", "replace").decode("utf-8")


def one_line(text: str, limit: int = 500) -> str:
    """A message as one printable line of at most `limit` characters."""
    text = " ".join(_printable(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _clean_prompt(prompt: str) -> str:
    """Command-line text as the model should see it: undecodable bytes (surrogate escapes of
    invalid UTF-8) and control characters become spaces."""
    prompt = prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(" " if (ord(ch) < 32 or 127 <= ord(ch) < 160 or ch == "\ufffd") else ch
                   for ch in prompt)
