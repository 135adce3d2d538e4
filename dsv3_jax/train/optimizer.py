"""AdamW and the schedules of the training recipe (arXiv 2412.19437 §4.2, docs/architecture.md §8): the
learning rate, the MTP weight lambda and the bias rate gamma."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from ..config import TrainConfig
from ..model.transformer import STACKS


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up 0 -> peak, constant, cosine to final_lr, then final_lr and any `lr_tail` constants."""
    parts = [optax.linear_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1))]
    bounds = [max(tc.warmup_steps, 1)]
    if tc.stable_steps:
        parts.append(optax.constant_schedule(tc.learning_rate))
        bounds.append(bounds[-1] + tc.stable_steps)
    if tc.decay_steps:
        parts.append(optax.cosine_decay_schedule(tc.learning_rate, tc.decay_steps,
                                                 alpha=tc.final_lr / tc.learning_rate))
        bounds.append(bounds[-1] + tc.decay_steps)
        parts.append(optax.constant_schedule(tc.final_lr))
    else:
        parts.append(optax.constant_schedule(tc.learning_rate))
    for step, lr in tc.lr_tail:
        parts.append(optax.constant_schedule(lr))
        bounds.append(int(step))
    return optax.join_schedules(parts, bounds)


def decay_mask(params):
    """Weight decay on matrices only: never on norm scales (the router bias is not a param at all)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] != "scale" for k in flat})


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    if tc.moment_dtype == "float32":
        adamw = optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                            weight_decay=tc.weight_decay, mask=decay_mask)
    else:   # optax.adamw's chain with both moments stored in the narrow dtype (its mu_dtype covers mu only)
        adamw = optax.chain(scale_by_adam_stored_as(jnp.dtype(tc.moment_dtype), tc.b1, tc.b2, tc.eps),
                            optax.add_decayed_weights(tc.weight_decay, decay_mask),
                            optax.scale_by_learning_rate(learning_rate_schedule(tc)))
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's update with both moments kept in `dtype` (bf16 halves their memory; the paper keeps them in
    BF16, arXiv 2412.19437 sec. 3.3.2): each step reads them into fp32, updates, and stores them back."""
    f32 = jnp.float32

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(grads, state, params=None):
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)), grads, state.nu)
        c1, c2 = 1 - b1 ** count.astype(f32), 1 - b2 ** count.astype(f32)
        updates = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, grads)
        store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)      # noqa: E731
        return updates, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

    return optax.GradientTransformation(init, update)


def is_stacked(path) -> bool:
    """A leaf of a scanned layer stack: its leading axis is the layer axis (dsv3_jax/model/transformer.py)."""
    return any(getattr(k, "key", None) in STACKS for k in path)


# A stacked leaf at least this large (its global size, in bytes) is updated one layer at a time; a smaller one
# in one fused pass. Every stacked matrix of the 671B model is far above it; the CPU presets' leaves are below,
# where the loop's per-layer slices and writes cost more than the temporaries they save
# (experiments/results/train_speed.md).
LAYER_LOOP_MIN_BYTES = 64 << 20


def apply_adamw(tc: TrainConfig, grads, opt_state, params, grad_norm: jax.Array, ok: jax.Array,
                layer_loop_min_bytes: int | None = None):
    """make_optimizer's update (clip by global norm, AdamW, learning rate) and optax.apply_updates in one pass,
    one layer at a time: -> (new params, new opt_state). Same math and state layout as the optax chain.

    The optax chain builds every intermediate (clipped grads, fp32 moments before their store, updates, new
    params) for the whole tree at once: several full fp32 copies of the model per device. Here a large stacked
    [L,...] leaf (`layer_loop_min_bytes`, default LAYER_LOOP_MIN_BYTES) is updated layer by layer in a
    fori_loop that writes params and moments back in place, so the temporaries are one layer's; smaller leaves
    in one elementwise pass each. `grad_norm` is the global norm of `grads` (computed once by the caller);
    where `ok` is false (a non-finite step) nothing changes, selected per layer instead of copying the tree."""
    min_bytes = LAYER_LOOP_MIN_BYTES if layer_loop_min_bytes is None else layer_loop_min_bytes
    f32 = jnp.float32
    clip_state, (adam, decay_state, sched) = opt_state
    count = optax.safe_increment(adam.count)
    c1, c2 = 1 - tc.b1 ** count.astype(f32), 1 - tc.b2 ** count.astype(f32)
    lr = learning_rate_schedule(tc)(sched.count)
    clipped = grad_norm < tc.grad_clip

    def one(g, p, mu, nu, decay):
        return adamw_leaf(tc, g, p, mu, nu, decay, grad_norm=grad_norm, clipped=clipped, ok=ok, c1=c1, c2=c2, lr=lr)

    def leaf(path, g, p, mu, nu, decay):
        if not is_stacked(path) or p.size * p.dtype.itemsize < min_bytes:
            return one(g, p, mu, nu, decay)

        def layer(i, carry):
            at = lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)      # noqa: E731
            new = one(at(g), *map(at, carry), decay)
            return tuple(jax.lax.dynamic_update_index_in_dim(x, y, i, 0) for x, y in zip(carry, new))
        return jax.lax.fori_loop(0, p.shape[0], layer, (p, mu, nu))

    out = jax.tree_util.tree_map_with_path(leaf, grads, params, adam.mu, adam.nu, decay_mask(params))
    pick = lambda k: jax.tree.map(lambda _, t: t[k], params, out)                   # noqa: E731
    keep = lambda new, old: jnp.where(ok, new, old)                                   # noqa: E731
    adam = adam._replace(count=keep(count, adam.count), mu=pick(1), nu=pick(2))
    sched = sched._replace(count=keep(optax.safe_increment(sched.count), sched.count))
    return pick(0), (clip_state, (adam, decay_state, sched))


def adamw_leaf(tc: TrainConfig, g, p, mu, nu, decay: bool, *, grad_norm, clipped, ok, c1, c2, lr):
    """One leaf (or one layer of it) of `apply_adamw` -> (p, mu, nu), each in its stored dtype."""
    f32 = jnp.float32
    g = jnp.where(clipped, g, (g / grad_norm.astype(g.dtype)) * tc.grad_clip).astype(f32)
    mu_f = (1 - tc.b1) * g + tc.b1 * mu.astype(f32)
    nu_f = (1 - tc.b2) * jnp.square(g) + tc.b2 * nu.astype(f32)
    mu_new, nu_new = jnp.where(ok, mu_f.astype(mu.dtype), mu), jnp.where(ok, nu_f.astype(nu.dtype), nu)
    # fp32 moments: the update reads the stored new moments (the same values where ok; where not, p is kept
    # anyway). Then no pass needs the old moments after their buffers are overwritten, and XLA neither copies
    # them first nor recomputes the moments in the parameter's pass: the update moves about half the bytes
    # (experiments/results/train_speed.md, "The whole step after session 8").
    m, v = (mu_new, nu_new) if mu.dtype == f32 and nu.dtype == f32 else (mu_f, nu_f)
    u = (m / c1) / (jnp.sqrt(v / c2) + tc.eps)
    if decay:
        u = u + tc.weight_decay * p
    return jnp.where(ok, (p + -lr * u).astype(p.dtype), p), mu_new, nu_new


def mtp_lambda(tc: TrainConfig, step) -> jax.Array:
    late = (tc.mtp_lambda_switch_step >= 0) & (step >= tc.mtp_lambda_switch_step)
    return jnp.where(late, tc.mtp_lambda_late, tc.mtp_lambda)


def bias_rate(tc: TrainConfig, step) -> jax.Array:
    """gamma: bias_update_rate (V3: 0.001); optionally cosine-decayed alongside the lr to
    bias_update_rate_final; 0 from bias_update_stop_step (V3 froze the bias for its last 500B tokens)."""
    gamma = jnp.asarray(tc.bias_update_rate, jnp.float32)
    if tc.bias_update_rate_final >= 0 and tc.decay_steps:
        start = max(tc.warmup_steps, 1) + tc.stable_steps
        frac = jnp.clip((step - start) / tc.decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * frac))
        gamma = tc.bias_update_rate_final + (tc.bias_update_rate - tc.bias_update_rate_final) * cosine
    stopped = (tc.bias_update_stop_step >= 0) & (step >= tc.bias_update_stop_step)
    return jnp.where(stopped, 0.0, gamma)
