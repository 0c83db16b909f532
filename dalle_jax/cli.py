"""Command lines: thin wrappers that parse arguments, call the library and turn every
expected failure into one clear line on stderr with a non-zero exit status."""

from __future__ import annotations

import argparse
import sys


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

    from dalle_jax import config as config_lib
    from dalle_jax.checkpoint import CheckpointError
    try:
        config = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        return _fail(str(e))
    if args.coordinator or args.num_processes:
        from dalle_jax import sharding
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from dalle_jax.train.loop import TrainingError, train_and_evaluate
    try:
        train_and_evaluate(config, args.workdir)
    except (CheckpointError, TrainingError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return 0


def sample_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sample.py", description="Draw pictures from a prompt.")
    parser.add_argument("prompt", nargs="?")
    parser.parse_args(argv)
    return _fail("sampling needs a generator, which dalle_jax does not have yet (the GAN and "
                 "unCLIP generators are being built); only CLIP training works so far", 1)
