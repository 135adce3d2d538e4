"""Orbax checkpoints of the whole run: train state (step, params, optimizer state, router state, RNG) plus
the data iterator position, saved asynchronously every N steps, the last K kept.

Orbax writes each step into a temporary folder and renames it when complete, and only lists finished steps,
so an interrupted save is never picked up. Orbax checksums none of the array bytes, so each save also records
a position-weighted checksum of every array (beside the data position, in the `data` item) and a restore
recomputes it: a latest step that fails to restore or to match (corrupt, truncated, overwritten) is skipped
with a warning naming it, and the previous good one is used. Restoring takes the target shardings, so a run
saved on one mesh resumes on another (the checksums do not depend on the sharding).

A failed save (a full disk, say) raises CheckpointError naming the step and the last finished checkpoint,
which the failed one never touches: older steps are only deleted after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import serialization

from ..config import RunConfig, config_json_kind
from ..errors import InputError, MissingInputError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"          # the run's orbax steps, beside CONFIG_FILE
CHECKSUM_KEY = "state_checksums"     # in the `data` JSON item, beside the iterator state
BAD_DIR = "bad_checkpoints"          # <run_dir>/bad_checkpoints/<step>-<time>: steps set aside, never deleted


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
        raise MissingInputError(f"run directory {run_dir} does not exist")
    if not os.path.exists(path):
        raise MissingInputError(f"{run_dir} has no {CONFIG_FILE}: it is not a dsv3_jax run directory")
    with open(path) as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not a valid run config: {e}") from None
    if config_json_kind(raw) == "hf":
        raise InputError(f"{run_dir} is a Hugging Face checkpoint, not a dsv3_jax run: pass it as --hf-dir "
                         "(generate, convert) or start a run from it with --init-from (train)")
    try:
        return RunConfig.from_dict(raw)
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a valid run config: {e}") from None


_ODD = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646D, 0xFD7046C5, 0xB55A4F09)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """sum over elements of bits * (odd weight of the position), mod 2^32: exact integer arithmetic, so it does not
    depend on how the array is sharded or reduced; any change to one element changes it."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)   # 8-byte types gain a trailing 2
    pos = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(_ODD[d % len(_ODD)])
    return jnp.sum(bits * (pos * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state_dict: Any) -> dict:
    """{path: uint32 checksum} of every array in a (state-dict) pytree."""
    sums = jax.device_get(_checksums(state_dict))
    return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def verify_checksums(expected: Optional[dict], state_dict: Any, partial: bool = False) -> None:
    """CheckpointError unless the arrays match the checksums recorded when they were saved. partial: only the
    arrays restored are compared (a partial restore). Checkpoints written before checksums existed have none."""
    if expected is None:
        return
    actual = state_checksums(state_dict)
    keys = set(actual) if partial else set(expected) | set(actual)
    bad = sorted(k for k in keys if expected.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{len(bad)} array(s) differ from the checksums recorded when it was saved: "
                              f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}")


def first_restorable(directory: str, steps: list[int], restore_step):
    """-> (step, restore_step(step)) for the first of `steps` (newest first) that restores cleanly; the ones that
    fail are named in a warning, and CheckpointError lists them all when none restores."""
    errors = []
    for s in steps:
        try:
            return s, restore_step(s)
        except Exception as e:  # orbax raises many types for corrupt data; we only fall back
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
            warnings.warn(f"checkpoint step {s} in {directory} could not be restored "
                          f"({type(e).__name__}: {str(e)[:200]}); falling back to an earlier one", stacklevel=3)
    raise CheckpointError(f"no checkpoint in {directory} could be restored:\n  " + "\n  ".join(errors))


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True, cleanup_tmp: bool = False):
        """cleanup_tmp: delete the temporary folders of saves a crash interrupted (only the process that owns
        the run, i.e. training, should: a reader would delete a save in progress)."""
        self.run_dir = os.path.abspath(run_dir)
        self.directory = os.path.join(self.run_dir, CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=cleanup_tmp)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._pending: Optional[int] = None      # step of a save that may still be running

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def _save_error(self, step: Optional[int], e: BaseException) -> CheckpointError:
        try:
            done = self.all_steps()
        except Exception:  # the listing itself may fail on a broken disk; the message must not
            done = []
        kept = (f"the last finished checkpoint, step {done[-1]}, is intact: fix the cause (free disk space?) and "
                f"continue with --resume" if done else "no finished checkpoint exists yet")
        return CheckpointError(f"saving checkpoint step {step} in {self.directory} failed "
                               f"({type(e).__name__}: {e}); {kept}")

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Start saving `step` (asynchronously); raises CheckpointError if it, or the save before it, failed."""
        self.wait()
        if not force and not self.manager.should_save(step):
            return False
        state_dict = serialization.to_state_dict(state)
        data = dict(data_state, **{CHECKSUM_KEY: state_checksums(state_dict)})
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_dict), data=ocp.args.JsonSave(data)), force=force)
        except Exception as e:
            raise self._save_error(step, e) from e
        if saved:
            self._pending = step
        return saved

    def wait(self) -> None:
        """Block until the last save is finished; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._settle_failed_save()
            raise self._save_error(self._pending, e) from e
        finally:
            self._pending = None

    def _settle_failed_save(self, timeout_s: float = 600.0) -> None:
        """Wait for the other writers of a save that failed. Orbax's background thread stops at the first item
        that fails and reports it while the other items' writers still write into the step's temporary
        folder; a run resumed in the same process (a notebook, a test) would clean that folder and save
        into it under them (OSError: Directory not empty). Orbax's private names, looked up defensively: where
        a release lacks them this waits for nothing, as before."""
        async_manager = getattr(getattr(self.manager, "_checkpointer", None), "_async_manager", None)
        for commit in list(getattr(async_manager, "_commit_futures", None) or ()):
            try:
                commit.result(timeout=timeout_s)
            except Exception:  # the failure itself, or a sibling's: the save is reported failed either way
                pass

    def set_aside(self, steps: list[int]) -> list[str]:
        """Move unusable steps to <run_dir>/bad_checkpoints/ (kept for inspection) so that a resumed run can save
        those step numbers again; -> the new paths. Process 0 moves, every process waits for it."""
        moved = []
        if steps and jax.process_index() == 0:
            os.makedirs(os.path.join(self.run_dir, BAD_DIR), exist_ok=True)
            for s in steps:
                dst = os.path.join(self.run_dir, BAD_DIR, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(os.path.join(self.directory, str(s)), dst)
                moved.append(dst)
        if steps and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("dsv3_jax_set_aside_checkpoints")
        self.manager.reload()
        return moved

    def restore(self, abstract_state: Any, shardings: Any, step: Optional[int] = None):
        """-> (step, state, data_state) from `step`, or the newest step that restores cleanly."""
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        target_dict = serialization.to_state_dict(target)

        def restore_step(s):
            out = self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target_dict), data=ocp.args.JsonRestore()))
            data = dict(out["data"])
            verify_checksums(data.pop(CHECKSUM_KEY, None), out["state"])
            return serialization.from_state_dict(abstract_state, out["state"]), data

        s, (state, data) = first_restorable(self.directory, steps, restore_step)
        return s, state, data

    def close(self) -> None:
        """Wait for the last save (CheckpointError if it failed) and release orbax's threads."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # a failed save raises again here; wait() already reported it
                pass
