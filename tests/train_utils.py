"""Small configs and helpers shared by the training tests (kept tiny so each compile takes seconds)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dsv3_jax.config import MeshConfig, ModelConfig, RunConfig, TrainConfig

TEST_MODEL = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, first_k_dense_replace=1,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    rope_scaling=None, max_position_embeddings=256, num_nextn_predict_layers=1, moe_impl="dense",
)

TEST_TRAIN = TrainConfig(steps=10, global_batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=2,
                         eval_every=5, eval_batches=1, checkpoint_every=5, val_fraction=0.1,
                         bias_update_rate=1e-2)


def make_run(mesh: MeshConfig = MeshConfig(data=1), model_changes=None, **train_changes) -> RunConfig:
    model = dataclasses.replace(TEST_MODEL, **(model_changes or {}))
    return RunConfig(model, dataclasses.replace(TEST_TRAIN, **train_changes), mesh)


def synthetic_batches(n: int, batch: int, seq_len: int, vocab: int = 256, seed: int = 0) -> list:
    """Token batches with some structure (repeated motifs), so the loss and routing move."""
    rng = np.random.default_rng(seed)
    motifs = rng.integers(0, vocab, (16, 8))
    out = []
    for _ in range(n):
        rows = [np.concatenate([motifs[i] for i in rng.integers(0, 16, seq_len // 8 + 1)])[:seq_len + 1]
                for _ in range(batch)]
        out.append(np.stack(rows).astype(np.int32))
    return out


def write_corpus(path, n_bytes: int = 60_000, seed: int = 0) -> str:
    """A text file with learnable structure."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "expert", "router", "latent", "token", "\n", "def ", "(x):"]
    text, size = [], 0
    while size < n_bytes:
        w = words[rng.integers(0, len(words))] + " "
        text.append(w)
        size += len(w)
    with open(str(path), "w") as fh:
        fh.write("".join(text))
    return str(path)


def run_steps(rc: RunConfig, batches: list, devices=None):
    """Apply the jitted train step to each batch on rc.mesh; -> (losses, metrics list, final state)."""
    import jax
    from dsv3_jax.model import Transformer
    from dsv3_jax.sharding import activate_for, batch_sharding, make_mesh
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.state import create_train_state, state_shardings
    from dsv3_jax.train.step import make_train_step

    mesh = make_mesh(rc.mesh, devices if devices is not None else jax.devices())
    model, opt = Transformer(rc.model), make_optimizer(rc.train)
    state = create_train_state(model, rc, mesh, opt)
    _, shardings = state_shardings(model, rc, mesh, opt)
    with activate_for(mesh, rc.mesh):
        step = jax.jit(make_train_step(model, rc, opt), in_shardings=(shardings, batch_sharding(mesh)))
        metrics = []
        for b in batches:
            state, m = step(state, jax.device_put(b, batch_sharding(mesh)))
            metrics.append(jax.device_get(m))
    return [float(m["loss"]) for m in metrics], metrics, state
