"""Sharded import: `load_checkpoint(path, mesh=...)` returns jax.Arrays with the training shardings whose
values equal the unsharded load bitwise (fp32, bf16 and FP8 checkpoints, fused expert tensors), and each
shard's callback reads only the slices it covers."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from dsv3_jax.config import MeshConfig
from dsv3_jax.hf import load_checkpoint, save_checkpoint, variable_shardings, write_fp8_checkpoint
from dsv3_jax.sharding import make_mesh
from test_hf_io import CFG, FP8_CFG, rewrite


def _assert_bitwise(sharded, whole):
    fs, fw = traverse_util.flatten_dict(sharded), traverse_util.flatten_dict(whole)
    assert sorted(fs) == sorted(fw)
    for k, x in fs.items():
        assert isinstance(x, jax.Array), k
        assert x.dtype == fw[k].dtype and x.shape == fw[k].shape, k
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(fw[k]).view(np.uint8),
                                      err_msg="/".join(k))


@pytest.mark.parametrize("kind,mesh_cfg", [("bf16", MeshConfig(data=4, expert=2, tensor=1, zero3=True)),
                                           ("fp8", MeshConfig(data=2, expert=2, tensor=2, zero3=True)),
                                           ("fp8", MeshConfig(data=2, expert=2, tensor=2, zero3=True, fsdp=True)),
                                           ("fused", MeshConfig(data=1, expert=4, tensor=2))])
def test_sharded_load_equals_unsharded_bitwise(kind, mesh_cfg, tmp_path, random_variables):
    cfg = FP8_CFG if kind == "fp8" else CFG
    path = str(tmp_path / kind)
    v = random_variables(cfg, seed=11)
    if kind == "fp8":
        write_fp8_checkpoint(path, cfg, v, shard_size_bytes=300_000)
    else:
        save_checkpoint(path, cfg, v, dtype="bfloat16" if kind == "bf16" else None, shard_size_bytes=40_000)
    if kind == "fused":
        single = str(tmp_path / "single")
        save_checkpoint(single, cfg, v)
        path = single

        def fuse(t):
            for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
                p, e = f"model.layers.{layer}.mlp.experts.", range(cfg.n_routed_experts)
                t[p + "gate_up_proj"] = np.stack([np.concatenate([t.pop(f"{p}{i}.gate_proj.weight"),
                                                                  t.pop(f"{p}{i}.up_proj.weight")]) for i in e])
                t[p + "down_proj"] = np.stack([t.pop(f"{p}{i}.down_proj.weight") for i in e])
        rewrite(path, fuse)
    mesh = make_mesh(mesh_cfg)
    _, whole = load_checkpoint(path)
    cfg2, sharded = load_checkpoint(path, mesh=mesh, zero3=mesh_cfg.zero3, fsdp=mesh_cfg.fsdp)
    assert cfg2 == cfg
    _assert_bitwise(sharded, whole)
    # The training shardings: experts over `expert`, heads over `tensor`, `embed` over `data` under zero3.
    want = variable_shardings(cfg, mesh, mesh_cfg.zero3, mesh_cfg.fsdp)
    for k, x in traverse_util.flatten_dict(sharded).items():
        assert x.sharding.is_equivalent_to(want[k], x.ndim), k
    experts = sharded["params"]["moe_layers"]["layers"]["moe"]["experts_gate_up"]
    assert experts.sharding.spec[1] == "expert"
    if mesh_cfg.zero3:
        assert "data" in jax.tree.leaves(tuple(sharded["params"]["embedding"].sharding.spec))


def test_each_shard_reads_only_its_slices(tmp_path, random_variables, monkeypatch):
    """On a (data=1, expert=4, tensor=2) mesh the 8 devices hold distinct shards of every expert and
    tensor-split weight: the bytes read for all of them together stay close to one copy of the checkpoint
    (replicated leaves are read once per distinct shard: once), far below 8 copies."""
    from dsv3_jax import safetensors_io
    path = str(tmp_path / "c")
    save_checkpoint(path, CFG, random_variables(CFG, seed=2))
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    counted = []
    close = safetensors_io.SafetensorsFile.close

    def counting_close(self):
        counted.append(self.bytes_read)
        close(self)
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "close", counting_close)
    load_checkpoint(path, mesh=make_mesh(MeshConfig(data=1, expert=4, tensor=2)))
    read = sum(counted)
    # Not read: the MTP copies of embed_tokens and lm_head (checked by the unsharded load only).
    dup = 2 * CFG.vocab_size * CFG.hidden_size * 4
    print(f"\nread {read} of {total} bytes ({read / total:.2f}); the MTP copies are {dup} bytes")
    assert read <= total - dup + 4096
    assert read >= (total - dup) * 0.9


def test_init_from_keeps_the_runs_own_model_choices(tmp_path, random_variables):
    """`train --init-from` with model overrides a config.json does not carry (attention form, dispatch, slot
    passes, capacities, remat): the checkpoint loads onto the mesh with them, bitwise, and the run keeps them.
    Before, any such field the loader was not handed read as an architecture change and was refused."""
    from dsv3_jax.config import run_preset
    from dsv3_jax.runs import init_from_config, init_variables
    path = str(tmp_path / "c")
    v = random_variables(CFG, seed=3)
    save_checkpoint(path, CFG, v)
    rc = init_from_config(path, run_preset("tiny").override([
        "model.attention_impl=blocked", "model.attention_block=64", "model.moe_slot_passes=true",
        "model.moe_capacity_fractions=[1.0]", "model.remat_policy=full", "model.moe_impl=dense"]))
    assert (rc.model.attention_impl, rc.model.moe_slot_passes, rc.model.hidden_size) == ("blocked", True,
                                                                                         CFG.hidden_size)
    loaded = init_variables(path, rc, make_mesh(MeshConfig(data=2, expert=2, tensor=2)), fresh=v)
    _assert_bitwise(loaded["params"], load_checkpoint(path)[1]["params"])


@pytest.mark.parametrize("mesh_options", ["mesh.zero3=true,mesh.fsdp=true", "mesh.zero3=true,mesh.fsdp=false"])
def test_init_from_loads_into_the_train_states_own_shardings(mesh_options, tmp_path, random_variables):
    """`train --init-from` reads each tensor straight into the sharding the train state stores it in, FSDP
    included, so the step-0 `device_put` moves nothing. Before, the loader used the zero3 rules without
    fsdp and the train loop resharded every non-expert weight once more at load."""
    from dsv3_jax.config import run_preset
    from dsv3_jax.model import Transformer
    from dsv3_jax.runs import init_from_config, init_variables
    from dsv3_jax.train.state import state_shardings
    path = str(tmp_path / "c")
    v = random_variables(CFG, seed=4)
    save_checkpoint(path, CFG, v)
    rc = init_from_config(path, run_preset("tiny").override(
        ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2", *mesh_options.split(",")]))
    mesh = make_mesh(rc.mesh)
    loaded = init_variables(path, rc, mesh, fresh=v)
    _, shardings = state_shardings(Transformer(rc.model), rc, mesh)
    want = traverse_util.flatten_dict(shardings.params)
    got = traverse_util.flatten_dict(loaded["params"])
    assert sorted(got) == sorted(want)
    moved = [k for k, x in got.items() if not x.sharding.is_equivalent_to(want[k], x.ndim)]
    assert not moved, f"{len(moved)} leaves would be resharded at load, e.g. {moved[:3]}"
    # FSDP splits the embedding's hidden axis over data x expert (zero3 alone: data), its vocab over tensor
    embed_axes = set(jax.tree.leaves(tuple(got[("embedding",)].sharding.spec)))
    assert embed_axes == ({"data", "expert", "tensor"} if rc.mesh.fsdp else {"data", "tensor"}), embed_axes
