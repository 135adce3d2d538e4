"""Code variants for experiments/train_ab.py (`NAME=@PATCH`): each patch swaps earlier forms of the model code
back in before that variant's step is traced, and returns a function that restores the current code.

    python experiments/train_ab.py "before=@before_session8" "now="
"""

from __future__ import annotations

import jax.numpy as jnp

import dsv3_jax.model.layers as layers
import dsv3_jax.model.mla as mla


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


def core_bwd_contracting_rows():
    mla.attention_core.defvjp(mla._attention_core_fwd, _core_bwd_contracting_rows)
    return lambda: mla.attention_core.defvjp(mla._attention_core_fwd, mla._attention_core_bwd)


def autodiff_dense():
    saved = layers.dense
    mla.dense = layers.dense = _autodiff_dense

    def undo():
        mla.dense = layers.dense = saved
    return undo


def before_session8():
    """Both of the above: the attention core's backward and the projections' weight gradients as at faaa471."""
    undo = [core_bwd_contracting_rows(), autodiff_dense()]
    return lambda: [u() for u in undo]


PATCHES = {f.__name__: f for f in (core_bwd_contracting_rows, autodiff_dense, before_session8)}
