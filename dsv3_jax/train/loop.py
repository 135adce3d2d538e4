"""The training driver: data, mesh, state (fresh or resumed), the jitted step, logging, evaluation,
checkpoints. Every process runs this same function; only process 0 writes logs."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np

from . import balance
from .. import data as data_lib
from ..config import RunConfig, config_kind
from ..errors import InputError, MissingInputError, OccupiedPathError
from ..model import Transformer
from ..sharding import activate_for, batch_sharding, make_mesh, validate_for_mesh
from .checkpoint import CHECKPOINT_DIR, CONFIG_FILE, Checkpointer, load_run_config, save_run_config
from .optimizer import make_optimizer
from .state import create_train_state, state_shardings
from .step import make_eval_step, make_train_step


class TrainingStopped(RuntimeError):
    """Raised when the run stops on purpose (too many non-finite steps); a good checkpoint was saved."""


PREEMPT_SYNC_EVERY = 4      # multi-process runs agree on a SIGTERM every this many steps (one tiny all-gather)


class Preemption:
    """SIGTERM (what TPU VMs and schedulers send before they take a machine) sets a flag; the loop finishes
    the step it is in, saves a checkpoint and returns. With several processes the flag is all-gathered every
    PREEMPT_SYNC_EVERY steps, so every process stops after the same step even if the signal reached only some
    of them, or reached them at different steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # signals only reach the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step`: the same answer on every process."""
        if jax.process_count() == 1:
            return self.requested
        if step % PREEMPT_SYNC_EVERY:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))


METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"     # what a run writes beside its checkpoints


def prepare_run_dir(run_dir: str, rc: Optional[RunConfig], resume: bool) -> RunConfig:
    """Fresh runs refuse a directory that already holds a run (or an HF checkpoint); resumes need one for the
    same model."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise OccupiedPathError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir "
                                "(nothing was overwritten)")
    has_run = os.path.exists(os.path.join(run_dir, CONFIG_FILE))
    if resume:
        if not has_run:
            raise MissingInputError(f"--resume: {run_dir} holds no run (no config.json); start it without "
                                    f"--resume")
        saved = load_run_config(run_dir)
        if rc is not None and rc.model != saved.model:
            diff = {k: (v, getattr(rc.model, k)) for k, v in saved.model.to_dict().items()
                    if getattr(rc.model, k) != v and not isinstance(v, dict)}
            raise InputError(f"--resume: {run_dir} holds a different model (saved vs asked: {diff}); "
                             f"nothing was changed")
        return rc or saved
    if has_run and config_kind(run_dir) == "hf":
        raise OccupiedPathError(f"{run_dir} holds a Hugging Face checkpoint, not a run: start a run from it with "
                                f"--init-from {run_dir} and a new --run-dir (nothing was overwritten)")
    if has_run:
        raise OccupiedPathError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                f"another --run-dir (nothing was overwritten)")
    # What a run writes, without its config.json: a fresh run would cut that metrics.jsonl back to step 0
    # and let its checkpoint manager garbage-collect those checkpoints. (An empty checkpoints/ is what
    # another process of this same run may just have made.)
    ckpt_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    leftovers = [name for name in (METRICS_FILE, TENSORBOARD_DIR) if os.path.exists(os.path.join(run_dir, name))]
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        leftovers.insert(0, CHECKPOINT_DIR + "/")
    if leftovers:
        raise OccupiedPathError(f"{run_dir} holds {', '.join(leftovers)} of an earlier run but no config.json, so "
                                f"it can neither be resumed nor reused: choose another --run-dir (nothing was "
                                f"overwritten)")
    return rc


def global_batch(local: np.ndarray, mesh, global_rows: int) -> jax.Array:
    """Each process contributes its own rows; together they form the sharded global batch."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local,
                                                  (global_rows,) + local.shape[1:])


def replicated_batch(full: np.ndarray, mesh) -> jax.Array:
    """A batch every process holds whole (validation), sharded like training batches."""
    return jax.make_array_from_callback(full.shape, batch_sharding(mesh), lambda idx: full[idx])


class MetricsLog:
    """metrics.jsonl (one object per step) and TensorBoard scalars; process 0 only."""

    def __init__(self, run_dir: str, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):  # drop lines from steps a crash lost, so the log reads like one run
            with open(self.path) as fh:
                keep = [l for l in fh if _logged_step(l) <= resume_step]
            tmp = self.path + ".tmp"        # rewritten atomically: a crash now must not lose the log
            with open(tmp, "w") as fh:
                fh.writelines(keep)
            os.replace(tmp, self.path)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
                elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/{i}", x, row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line a crash cut short (or a blank one) counts as lost."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _last_logged(run_dir: str, step: int) -> dict:
    """The last metrics.jsonl row at or before `step` ({} if none)."""
    try:
        with open(os.path.join(run_dir, METRICS_FILE)) as fh:
            rows = [json.loads(line) for line in fh if _logged_step(line) <= step]
    except OSError:
        return {}
    return rows[-1] if rows else {}


def _flat_max_vio(max_vio: dict) -> list:
    """Per MoE layer MaxVio, main layers first then MTP blocks."""
    return [float(x) for k in sorted(max_vio, key=lambda k: (k != "moe_layers", k))
            for x in np.atleast_1d(np.asarray(max_vio[k]))]


def _expert_load(counts: dict, router_state: dict) -> dict:
    """Per MoE layer (main layers first, then MTP blocks): this step's tokens per expert and the router
    biases after its update, for load heat maps and bias trajectories (TrainConfig.log_expert_load)."""
    biases = balance.router_biases(router_state)
    order = sorted(counts, key=lambda k: (k != "moe_layers", k))
    rows = lambda d: [[round(float(x), 6) for x in r] for k in order for r in np.atleast_2d(np.asarray(d[k]))]
    return {"expert_counts": rows(counts), "router_bias": rows(biases)}


def run_split(rc: RunConfig, tokenizer) -> tuple:
    """(train tokens, validation tokens) of a run, exactly as its training loop splits them."""
    tc = rc.train
    tokens = data_lib.load_tokens(tc.data, tokenizer, max_bytes=tc.max_corpus_bytes or None,
                                  vocab_size=rc.model.vocab_size)
    return data_lib.split_train_val(tokens, tc.val_fraction, min_val_tokens=tc.seq_len + 1)


def train(rc: Optional[RunConfig], run_dir: str, resume: bool = False, progress: bool = True,
          async_checkpoints: bool = True, stop_after: Optional[int] = None,
          init_variables: Optional[Callable] = None) -> dict:
    """Train until rc.train.steps (or `stop_after` more steps, for tests). Returns a summary.

    init_variables(rc, mesh, fresh) -> {'params', 'router_state'}: a fresh run's starting variables in
    place of the random init `fresh` (train --init-from; the optimizer state starts fresh either way)."""
    rc = prepare_run_dir(run_dir, rc, resume)
    mc, tc = rc.model, rc.train
    proc, nproc = jax.process_index(), jax.process_count()
    mesh = make_mesh(rc.mesh)
    validate_for_mesh(mc, mesh, tc.global_batch_size, tc.microbatches)
    if tc.seq_len > mc.max_position_embeddings:
        raise InputError(f"train.seq_len={tc.seq_len} is longer than model.max_position_embeddings="
                         f"{mc.max_position_embeddings}")

    tokenizer = data_lib.load_tokenizer(tc.tokenizer)
    if tokenizer.vocab_size > mc.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={mc.vocab_size}")
    train_tokens, val_tokens = run_split(rc, tokenizer)
    iterator = data_lib.make_train_iterator(train_tokens, tc.seq_len, tc.global_batch_size, tc.seed,
                                            process_index=proc, process_count=nproc)
    eval_batches = data_lib.make_eval_batches(val_tokens, tc.seq_len, tc.global_batch_size, tc.eval_batches)

    model = Transformer(mc)
    optimizer = make_optimizer(tc)
    abstract, shardings = state_shardings(model, rc, mesh, optimizer)
    ckpt = Checkpointer(run_dir, keep=tc.keep_checkpoints, async_save=async_checkpoints, cleanup_tmp=True)
    finished = ckpt.all_steps() if resume else []
    if finished:
        try:
            start, state, data_state = ckpt.restore(abstract, shardings)
            iterator.set_state(data_state)
        except BaseException:
            ckpt.close()
            raise
        bad = [s for s in finished if s > start]    # newer steps that did not restore: out of the way
        moved = ckpt.set_aside(bad)
        if proc == 0:
            print(f"resuming {run_dir} from checkpoint step {start}" + (
                f" (unusable newer step(s) {bad} moved to {moved})" if bad else ""), file=sys.stderr, flush=True)
    else:
        if resume and proc == 0:
            print(f"resuming {run_dir}: no finished checkpoint yet, starting from step 0", file=sys.stderr,
                  flush=True)
        start, state = 0, create_train_state(model, rc, mesh, optimizer)
        if init_variables is not None:
            v = init_variables(rc, mesh, {"params": state.params, "router_state": state.router_state})
            state = state.replace(params=jax.device_put(v["params"], shardings.params),
                                  router_state=jax.device_put(v["router_state"], shardings.router_state))
    if start >= tc.steps:                           # a resumed run with nothing left to do
        ckpt.close()
        if start > tc.steps:
            raise InputError(f"--resume: {run_dir} is at step {start}, past train.steps={tc.steps}; give "
                             f"train.steps above {start} to train further (nothing was changed)")
        if proc == 0:                               # done already: a restarted job exits 0
            print(f"{run_dir} already reached train.steps={tc.steps}: nothing to train (give train.steps above "
                  f"{start} to continue)", file=sys.stderr, flush=True)
        return {"start_step": start, "end_step": start, "state": state, "last": _last_logged(run_dir, start)}
    if proc == 0:
        save_run_config(run_dir, rc)

    with activate_for(mesh, rc.mesh):
        step_fn = jax.jit(make_train_step(model, rc, optimizer), donate_argnums=0,
                          in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None))
        eval_fn = jax.jit(make_eval_step(model))
    log = MetricsLog(run_dir, start, enabled=proc == 0)
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    bar = None
    if progress and proc == 0:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, dynamic_ncols=True, file=sys.stderr)

    def evaluate() -> tuple[float, list]:
        """Validation CE, and MaxVio per MoE layer over ALL validation tokens together (steadier than one
        training batch's)."""
        with activate_for(mesh, rc.mesh):
            outs = jax.device_get([eval_fn(state.params, state.router_state, replicated_batch(b, mesh))
                                   for b in eval_batches])
        counts = jax.tree.map(lambda *c: sum(c), *[o[1] for o in outs])
        vio = {k: balance.max_violation(np.asarray(c)) for k, c in counts.items()}
        return float(np.mean([float(o[0]) for o in outs])), _flat_max_vio(vio)

    summary: dict = {"start_step": start}
    tokens_per_step = tc.global_batch_size * tc.seq_len
    step, tick, last_logged = start, time.perf_counter(), start
    preemption = Preemption().__enter__()
    try:
        while step < end:
            batch = global_batch(next(iterator), mesh, tc.global_batch_size)
            with activate_for(mesh, rc.mesh):
                state, metrics = step_fn(state, batch)
            step += 1
            if step % tc.log_every == 0 or step == end:
                m = jax.device_get(metrics)
                now = time.perf_counter()
                row = {"step": step, "loss": float(m["loss"]), "ce": float(m["ce"]),
                       "mtp_loss": float(m["mtp_loss"]), "balance_loss": float(m["balance_loss"]),
                       "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                       "tokens_per_s": tokens_per_step * (step - last_logged) / (now - tick),
                       "max_vio": _flat_max_vio(m["max_vio"]), "skipped": int(m["skipped"]),
                       "total_skipped": int(state.total_skipped)}
                tick, last_logged = now, step
                if tc.log_expert_load:
                    row.update(_expert_load(m["expert_counts"], jax.device_get(state.router_state)))
                if step % tc.eval_every == 0 or step == tc.steps:
                    row["val_loss"], row["val_max_vio"] = evaluate()
                log.write(row)
                summary["last"] = row
                if bar is not None:
                    bar.update(step - bar.n)
                    post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}",
                            "MaxVio": f"{max(row['max_vio'], default=0):.2f}"}
                    if "val_loss" in row:
                        post["val"] = f"{row['val_loss']:.3f}"
                    bar.set_postfix(post)
            if int(state.skipped) >= tc.max_consecutive_skips:
                ckpt.save(step, state, iterator.get_state(), force=True)
                ckpt.wait()
                raise TrainingStopped(f"{tc.max_consecutive_skips} consecutive steps had a non-finite loss or "
                                      f"gradient; stopped at step {step} with the last good state saved")
            preempted = step < end and preemption.should_stop(step)
            if preempted or step % tc.checkpoint_every == 0 or step == end:
                ckpt.save(step, state, iterator.get_state(), force=preempted or step == end)
            if preempted:
                ckpt.wait()
                summary["preempted"] = True
                if proc == 0:
                    print(f"\nSIGTERM: stopped after step {step} with its checkpoint saved; continue with --resume",
                          file=sys.stderr, flush=True)
                break
    finally:
        preemption.__exit__()
        # Close everything even when one fails (a full disk fails them all); an error already on its way out
        # says more than one raised while closing, so it wins; otherwise the checkpoint's error does.
        failing, errors = sys.exc_info()[1], []
        for close in (log.close, bar.close if bar is not None else None, ckpt.close):
            try:
                if close is not None:
                    close()
            except Exception as e:
                errors.append(e)
        if errors and failing is None:
            raise errors[-1]
    summary.update(end_step=step, state=state)
    return summary
