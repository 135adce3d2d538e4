"""One jitted train step: CE + lambda * MTP + alpha * balance loss (sequence-wise by default, or batch-wise),
AdamW, then the bias rule (sign by default, or proportional) with the expert counts of the whole global
batch (every microbatch, every shard).

Under jit over a batch sharded on (data, expert), the counts computed in the forward are already global:
XLA inserts the all-reduce. A step whose loss or gradient is not finite changes nothing and is counted.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from . import balance
from ..config import RunConfig
from ..model import Transformer
from .optimizer import apply_adamw, bias_rate, learning_rate_schedule, mtp_lambda
from .state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean token CE in fp32 over the positions where mask is true."""
    # logsumexp minus the label's logit, picked by a one-hot product: its backward is elementwise, where
    # log_softmax + take_along_axis built [B,T,X] log-probs and a scatter (slower on CPU; the
    # measurement: experiments/results/config_choices.md).
    logits = logits.astype(jnp.float32)
    picked = (logits * jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)).sum(-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mtp_losses(mtp_logits: tuple, labels: jax.Array) -> list:
    """Depth k (1-based) at position i predicts token i+k+1 = labels[i+k]; the last k positions have no label."""
    t = labels.shape[1]
    out = []
    for k, logits in enumerate(mtp_logits, start=1):
        shifted = jnp.pad(labels[:, k:], ((0, 0), (0, k)))
        valid = jnp.broadcast_to(jnp.arange(t) < t - k, labels.shape)
        out.append(cross_entropy(logits, shifted, valid))
    return out


def make_loss_fn(model: Transformer, rc: RunConfig):
    mc, tc = rc.model, rc.train

    def loss_fn(params, router_state, tokens, step):
        """tokens [b, T+1] -> (total loss, aux). aux holds the pieces and the expert counts."""
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        out = model.apply({"params": params, "router_state": router_state}, inputs)
        ce = cross_entropy(out.logits, labels)
        mtp = mtp_losses(out.mtp_logits, labels)
        mtp_loss = sum(mtp) / len(mtp) if mtp else jnp.zeros((), jnp.float32)
        bal = (balance.total_balance_loss(out.moe_stats, mc.num_experts_per_tok, inputs.shape[1],
                                          tc.balance_loss)
               if out.moe_stats else jnp.zeros((), jnp.float32))
        total = ce + mtp_lambda(tc, step) * mtp_loss + tc.balance_alpha * bal
        return total, {"ce": ce, "mtp_loss": mtp_loss, "balance_loss": bal,
                       "counts": balance.counts_of(out.moe_stats)}

    return loss_fn


def make_train_step(model: Transformer, rc: RunConfig, optimizer: optax.GradientTransformation) -> Callable:
    """The jitted-to-be step. `optimizer` must be make_optimizer(rc.train), whose state it updates: the update
    itself runs as optimizer.apply_adamw, the same math one layer at a time."""
    tc = rc.train
    grad_fn = jax.value_and_grad(make_loss_fn(model, rc), has_aux=True)
    schedule = learning_rate_schedule(tc)

    def accumulate(params, router_state, batch, step):
        m = tc.microbatches
        if m == 1:
            return grad_fn(params, router_state, batch, step)
        # Microbatch j takes rows j, j+m, ... so that each is spread over every data shard.
        micro = batch.reshape(batch.shape[0] // m, m, -1).swapaxes(0, 1)

        def body(acc, tokens):
            # Each microbatch's share is scaled as it is added, in place into the carried fp32 sums: the live
            # gradient memory is those sums plus one microbatch's gradients, with no full-tree divide after.
            (loss, aux), grads = grad_fn(params, router_state, tokens, step)
            counts = aux.pop("counts")                # counts add up; losses and grads average
            share = jax.tree.map(lambda x: x / m, ((loss, aux), grads))
            return jax.tree.map(jnp.add, acc, (share, counts)), None

        (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, router_state, micro[0], step)
        counts0 = aux0.pop("counts")
        zeros = jax.tree.map(jnp.zeros_like, (((loss0, aux0), grads0), counts0))
        (((loss, aux), grads), counts), _ = jax.lax.scan(body, zeros, micro)
        return (loss, dict(aux, counts=counts)), grads

    def train_step(state: TrainState, batch: jax.Array):
        (loss, aux), grads = accumulate(state.params, state.router_state, batch, state.step)
        grad_norm = optax.tree.norm(grads)
        counts = aux.pop("counts")
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        # One layer at a time, the skip folded in as a select per layer: no whole-tree temporaries (no copy of
        # every parameter and moment for a branch, no fp32 moments or updates for all layers at once).
        params, opt_state = apply_adamw(tc, grads, state.opt_state, state.params, grad_norm, ok)
        router_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), balance.update_router_bias(
                state.router_state, counts, bias_rate(tc, state.step), tc.bias_update_rule), state.router_state)
        new_state = state.replace(
            step=state.step + ok.astype(jnp.int32), params=params, opt_state=opt_state,
            router_state=router_state, skipped=jnp.where(ok, 0, state.skipped + 1),
            total_skipped=state.total_skipped + (~ok).astype(jnp.int32))
        metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=schedule(state.step), skipped=~ok,
                       max_vio={k: balance.max_violation(c) for k, c in counts.items()},
                       expert_counts=counts)
        return new_state, metrics

    return train_step


def make_eval_step(model: Transformer) -> Callable:
    """-> (main-model CE, expert counts of every MoE layer, MTP blocks included)."""
    def eval_step(params, router_state, tokens):
        out = model.apply({"params": params, "router_state": router_state}, tokens[:, :-1])
        return cross_entropy(out.logits, tokens[:, 1:]), balance.counts_of(out.moe_stats)
    return eval_step
