"""Code variants for experiments/train_ab.py (`NAME=@PATCH`): each patch swaps earlier forms of the model code
back in before that variant's step is traced, and returns a function that restores the current code.

    python experiments/train_ab.py "before=@before_session8" "now="
"""

from __future__ import annotations

import jax.numpy as jnp

import dsv3_jax.model.layers as layers
import dsv3_jax.model.mla as mla
import dsv3_jax.train.optimizer as optimizer


def _core_bwd_contracting_rows(res, do):
    """attention_core's backward before session 8: dV = P^T dO and dK = dS^T Q contract over P's rows."""
    q, k, v, mask, probs, o = res
    dv = jnp.einsum("BHTS,BHTV->BHSV", probs.astype(do.dtype), do)
    dp = jnp.einsum("BHTV,BHSV->BHTS", do, v, preferred_element_type=jnp.float32)
    row = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1, keepdims=True)
    ds = (probs * (dp - row)).astype(q.dtype)
    dq = jnp.einsum("BHTS,BHSK->BHTK", ds, k)
    dk = jnp.einsum("BHTS,BHTK->BHSK", ds, q)
    return dq, dk, dv, None


def _autodiff_dense(x, w):
    """layers.dense without its custom weight gradient (autodiff's x^T dy)."""
    return jnp.dot(x, w)


def _adamw_leaf_old_moments(tc, g, p, mu, nu, decay, *, grad_norm, clipped, ok, c1, c2, lr):
    """optimizer.adamw_leaf before session 8: the parameter's update reads the old moments (recomputing the
    new ones), so XLA copies the old moments before overwriting them."""
    f32 = jnp.float32
    g = jnp.where(clipped, g, (g / grad_norm.astype(g.dtype)) * tc.grad_clip).astype(f32)
    mu_new = (1 - tc.b1) * g + tc.b1 * mu.astype(f32)
    nu_new = (1 - tc.b2) * jnp.square(g) + tc.b2 * nu.astype(f32)
    u = (mu_new / c1) / (jnp.sqrt(nu_new / c2) + tc.eps)
    if decay:
        u = u + tc.weight_decay * p
    p_new = (p + -lr * u).astype(p.dtype)
    return (jnp.where(ok, p_new, p), jnp.where(ok, mu_new.astype(mu.dtype), mu),
            jnp.where(ok, nu_new.astype(nu.dtype), nu))


def core_bwd_contracting_rows():
    mla.attention_core.defvjp(mla._attention_core_fwd, _core_bwd_contracting_rows)
    return lambda: mla.attention_core.defvjp(mla._attention_core_fwd, mla._attention_core_bwd)


def autodiff_dense():
    saved = layers.dense
    mla.dense = layers.dense = _autodiff_dense

    def undo():
        mla.dense = layers.dense = saved
    return undo


def adamw_old_moments():
    saved = optimizer.adamw_leaf
    optimizer.adamw_leaf = _adamw_leaf_old_moments

    def undo():
        optimizer.adamw_leaf = saved
    return undo


def before_session8():
    """All of the above: the attention core's backward, the projections' weight gradients and the AdamW
    update as at faaa471."""
    undo = [core_bwd_contracting_rows(), autodiff_dense(), adamw_old_moments()]
    return lambda: [u() for u in undo]


PATCHES = {f.__name__: f for f in (core_bwd_contracting_rows, autodiff_dense, adamw_old_moments, before_session8)}
