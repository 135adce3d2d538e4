"""Orbax checkpoints of the whole run: train state (step, params, optimizer state, router state, RNG) plus
the data iterator position, saved asynchronously every N steps, the last K kept.

Orbax writes each step into a temporary folder and renames it when complete, and only lists finished steps,
so an interrupted save is never picked up. A latest step that fails to restore (corrupt or truncated) is
skipped with a warning naming it, and the previous good one is used. Restoring takes the target shardings,
so a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from flax import serialization

from ..config import RunConfig

CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    pass


def save_run_config(run_dir: str, rc: RunConfig) -> None:
    """The config beside the checkpoints, written atomically (tmp + rename) so a crash never leaves half."""
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(rc.to_dict(), fh, indent=2)
    os.replace(tmp, os.path.join(run_dir, CONFIG_FILE))


def load_run_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE}: it is not a dsv3_jax run directory")
    with open(path) as fh:
        try:
            return RunConfig.from_dict(json.load(fh))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid run config: {e}") from None


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(serialization.to_state_dict(state)),
            data=ocp.args.JsonSave(data_state)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, shardings: Any, step: Optional[int] = None):
        """-> (step, state, data_state) from `step`, or the newest step that restores cleanly."""
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        target_dict = serialization.to_state_dict(target)
        errors = []
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target_dict), data=ocp.args.JsonRestore()))
            except Exception as e:  # orbax raises many types for corrupt data; we only fall back
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
                warnings.warn(f"checkpoint step {s} in {self.directory} could not be restored "
                              f"({type(e).__name__}); falling back to an earlier one", stacklevel=2)
                continue
            return s, serialization.from_state_dict(abstract_state, out["state"]), out["data"]
        raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
