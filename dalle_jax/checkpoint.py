"""The one wrapper around Orbax: every checkpoint in dalle_jax is written and read here.

A checkpoint step holds three items:
  state   the train state pytree (params, optimizer state, EMA params, step, rng), restored
          straight into its shardings;
  data    the input iterator's state (grain), so a resumed run sees exactly the batches an
          uninterrupted one would;
  meta    JSON: the config, the model family and a format version.
Saves are asynchronous and keep the newest `max_to_keep` steps; Orbax writes each step to a
temporary directory and renames it when complete, so a killed save is never mistaken for a
finished one.
"""

from __future__ import annotations

import os
import grain
import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, foreign or unreadable checkpoint. Its message is one line, for the user."""


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_iterator=None, meta: dict | None = None,
             force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave({"format_version": FORMAT_VERSION, **(meta or {})})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores into `abstract_state` (ShapeDtypeStructs with shardings). Returns
        (state, meta); `data_iterator`, if given, is set to the saved position in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state),
                 "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types; the user needs one clear line.
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        meta = restored["meta"] or {}
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {meta.get('format_version')} in "
                                  f"{self.directory} is not {FORMAT_VERSION}")
        return restored["state"], meta

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores straight into them."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)

