"""A training run's variables without its optimizer: restoring params and router state alone (generation,
export), exporting a run as a Hugging Face directory, and starting a run from one (`train --init-from`).

A run's checkpoint holds the whole train state; Adam's two moments are twice the params again, so
generation and export restore only the `params` and `router_state` subtrees (orbax partial restore) and
verify them against the checksums the save recorded (train/checkpoint.py), falling back to an older step
like a resume does.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import jax
import numpy as np

from .config import MeshConfig, ModelConfig, RunConfig, config_kind
from .errors import InputError, MissingInputError, OccupiedPathError

TOKENIZER_FILE = "tokenizer.json"


def _abstract_variables(cfg: ModelConfig, mesh, zero3: bool, fsdp: bool) -> dict:
    """{'params', 'router_state'} as ShapeDtypeStructs carrying their training shardings on `mesh`."""
    from flax import traverse_util
    from .hf import variable_shardings
    from .hf_layout import template
    shardings = variable_shardings(cfg, mesh, zero3, fsdp)
    return traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                                         for k, v in template(cfg).items()})


def restore_variables(run_dir: str, mesh=None, zero3: Optional[bool] = None, fsdp: Optional[bool] = None):
    """-> (RunConfig, step, {'params', 'router_state'}) from the newest finished checkpoint of a run that
    restores and matches its checksums, with the training shardings on `mesh` (default: one device;
    zero3 / fsdp default to the run's own).
    The optimizer state is never read."""
    import orbax.checkpoint as ocp
    from .sharding import make_mesh
    from .train.checkpoint import (CHECKPOINT_DIR, CHECKSUM_KEY, first_restorable, load_run_config,
                                   verify_checksums)

    rc = load_run_config(run_dir)             # names the problem if the directory is not a run
    directory = os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise MissingInputError(f"{run_dir} has no finished checkpoint yet")
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(data=1), jax.devices()[:1])
    target = _abstract_variables(rc.model, mesh, rc.mesh.zero3 if zero3 is None else zero3,
                                 rc.mesh.fsdp if fsdp is None else fsdp)
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target)
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = sorted(manager.all_steps())[::-1]
        if not steps:
            raise MissingInputError(f"{run_dir} has no finished checkpoint yet")

        def restore_step(step):
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                data=ocp.args.JsonRestore()))
            variables = {k: out["state"][k] for k in ("params", "router_state")}
            verify_checksums(dict(out["data"]).get(CHECKSUM_KEY), variables, partial=True)
            return variables

        step, variables = first_restorable(directory, steps, restore_step)
        return rc, step, variables
    finally:
        manager.close()


def _names(path: str) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _is_run(path: str) -> bool:
    """A dsv3_jax training run: checkpoints/, or a run's config.json."""
    from .train.checkpoint import CHECKPOINT_DIR
    return os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) or config_kind(path) == "run"


def _is_hf_checkpoint(path: str) -> bool:
    return config_kind(path) == "hf" and any(n.endswith(".safetensors") for n in os.listdir(path))


def check_output(out: str, sources: tuple, overwrite: bool) -> None:
    """Refuse an export's `out` where writing would lose something, before anything is read or written: one
    of the `sources`, a file, a training run (never overwritten), a non-empty directory (unless `overwrite`),
    or, even with `overwrite`, a directory that is not an HF checkpoint."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise OccupiedPathError(f"--out {out} is a file; give a directory to create (nothing was written)")
    real = os.path.realpath(out)
    if any(os.path.realpath(src) == real or os.path.realpath(src).startswith(real + os.sep)
           for src in sources if src):
        raise OccupiedPathError(f"--out {out} is or holds the checkpoint being converted; write to another "
                                "directory (nothing was written)")
    if not os.listdir(out):
        return
    if _is_run(out):
        raise OccupiedPathError(f"--out {out} holds a training run ({_names(out)}), which an export never "
                                "replaces; choose another directory (nothing was written)")
    if not overwrite:
        raise OccupiedPathError(f"--out {out} is not empty ({_names(out)}); choose a new directory, or pass "
                                "--overwrite to replace an earlier export (nothing was written)")
    if not _is_hf_checkpoint(out):
        raise OccupiedPathError(f"--out {out} is not an HF checkpoint ({_names(out)}); --overwrite only replaces "
                                "one (nothing was written)")


def write_directory(out: str, write) -> None:
    """`write(path)` into a new sibling of `out`, renamed to `out` once complete: an export that fails (a
    crash, a full disk, bad input found late) leaves `out` as it was. An existing `out` (check_output allowed
    it) is moved aside, replaced, then deleted."""
    import shutil
    import tempfile
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                 # as os.makedirs would create it, not mkdtemp's 0700
    try:
        write(tmp)
        if os.path.isdir(out) and os.listdir(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out, old)                   # onto the empty directory just made
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)                  # an empty `out` directory is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_run(run_dir: str, out: str, dtype: str = "bfloat16", shard_size_bytes: Optional[int] = 5 << 30,
               overwrite: bool = False) -> int:
    """Write the newest finished checkpoint of a run as an HF DeepSeek-V3 directory (config.json, shards
    and index, MTP module k at layer num_hidden_layers+k, router biases as e_score_correction_bias), plus
    the run's tokenizer.json when it has one. dtype: bfloat16 | float32 | fp8 (128x128 e4m3 blocks, as
    released). `out` is new or empty, or with `overwrite` an earlier HF export (check_output); it is written
    whole or not at all (write_directory). -> the step exported."""
    import shutil
    from .hf import save_checkpoint, write_fp8_checkpoint
    if dtype not in ("bfloat16", "float32", "fp8"):
        raise InputError(f"--dtype {dtype!r}: use bfloat16, float32 or fp8")
    check_output(out, (run_dir,), overwrite)
    rc, step, variables = restore_variables(run_dir)
    host = jax.tree.map(np.asarray, variables)
    del variables

    def write(path):
        if dtype == "fp8":
            write_fp8_checkpoint(path, rc.model, host, shard_size_bytes=shard_size_bytes)
        else:
            save_checkpoint(path, rc.model, host, shard_size_bytes=shard_size_bytes, dtype=dtype)
        if rc.train.tokenizer and os.path.isfile(rc.train.tokenizer):
            shutil.copyfile(rc.train.tokenizer, os.path.join(path, TOKENIZER_FILE))
    write_directory(out, write)
    return step


def convert_hf(hf_dir: str, out: str, dtype: str = "float32", overwrite: bool = False) -> None:
    """Re-save an HF checkpoint directory (FP8 -> bf16, say) at `out`, its tokenizer.json copied along; `out`
    as for export_run."""
    import shutil
    from .hf import load_checkpoint, save_checkpoint, write_fp8_checkpoint
    check_output(out, (hf_dir,), overwrite)
    cfg, variables = load_checkpoint(hf_dir)

    def write(path):
        if dtype == "fp8":
            write_fp8_checkpoint(path, cfg, variables)
        else:
            save_checkpoint(path, cfg, variables, dtype=dtype)
        if os.path.isfile(os.path.join(hf_dir, TOKENIZER_FILE)):
            shutil.copyfile(os.path.join(hf_dir, TOKENIZER_FILE), os.path.join(path, TOKENIZER_FILE))
    write_directory(out, write)


# ----------------------------------------------------------------------------------------------------------
# train --init-from HF_DIR

def run_choices(cfg: ModelConfig) -> dict:
    """The model fields a run chooses and an HF config.json does not carry (dtype, moe_impl, remat, the
    attention and dispatch options, ...): kept from the run's own config on top of a checkpoint's."""
    import dataclasses
    from .config import _HF_FIELDS
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)
            if f.name not in _HF_FIELDS and f.name != "rope_scaling"}


def init_from_config(hf_dir: str, rc: RunConfig) -> RunConfig:
    """The run config of a fine-tune: the model from HF_DIR's config.json (keeping the run's non-HF model
    fields such as moe_impl, dtype and remat), the tokenizer from HF_DIR's tokenizer.json when present."""
    import dataclasses
    from .config import load_hf_config
    if not os.path.isdir(hf_dir):
        raise MissingInputError(f"--init-from {hf_dir}: no such directory")
    model = load_hf_config(hf_dir).replace(**run_choices(rc.model))
    train = rc.train
    tok = os.path.join(hf_dir, TOKENIZER_FILE)
    if os.path.isfile(tok) and train.tokenizer is None:
        train = dataclasses.replace(train, tokenizer=os.path.abspath(tok))
    return dataclasses.replace(rc, model=model, train=train)


def init_variables(hf_dir: str, rc: RunConfig, mesh, fresh: dict) -> dict:
    """{'params', 'router_state'} for step 0 of a fine-tune: every tensor of the checkpoint, loaded onto
    `mesh` with the training shardings; an MTP module the checkpoint lacks keeps its fresh initialisation
    (`fresh`, the run's own init) and a message says so."""
    from .hf import load_checkpoint
    cfg = rc.model
    kw = {f: getattr(cfg, f) for f in ("param_dtype", "moe_impl", "moe_block_size", "remat_policy", "scan_unroll")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no MTP module.*")
        loaded_cfg, loaded = load_checkpoint(hf_dir, dtype=cfg.param_dtype, mesh=mesh, zero3=rc.mesh.zero3,
                                             fsdp=rc.mesh.fsdp, **kw)   # the train state's own layout
    loaded_cfg = loaded_cfg.replace(**run_choices(cfg))     # dtype, dispatch, attention: the run's own choice
    if loaded_cfg.replace(num_nextn_predict_layers=cfg.num_nextn_predict_layers) != cfg:
        diff = {k: (getattr(loaded_cfg, k), getattr(cfg, k)) for k in loaded_cfg.to_dict()
                if k != "num_nextn_predict_layers" and getattr(cfg, k) != getattr(loaded_cfg, k)}
        raise InputError(f"--init-from {hf_dir}: model.* overrides change the checkpoint's architecture "
                         f"(checkpoint vs asked: {diff}); only non-architecture fields (moe_impl, dtype, remat_policy, "
                         f"...) may be overridden")
    if loaded_cfg.num_nextn_predict_layers > cfg.num_nextn_predict_layers:
        raise InputError(f"--init-from {hf_dir}: model.num_nextn_predict_layers={cfg.num_nextn_predict_layers} is "
                         f"below the checkpoint's {loaded_cfg.num_nextn_predict_layers}")
    if loaded_cfg.num_nextn_predict_layers < cfg.num_nextn_predict_layers:
        missing = [f"mtp_{k}" for k in range(loaded_cfg.num_nextn_predict_layers, cfg.num_nextn_predict_layers)]
        if jax.process_index() == 0:
            print(f"--init-from {hf_dir}: the checkpoint has no MTP module ({', '.join(missing)}); it starts "
                  f"from a fresh initialisation", file=sys.stderr, flush=True)
        for tree in ("params", "router_state"):
            for name in missing:
                if name in fresh[tree]:
                    loaded[tree][name] = fresh[tree][name]
    return loaded
