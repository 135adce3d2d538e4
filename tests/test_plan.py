"""`python -m dsv3_jax plan`: topology names, the collective parser, and (when libtpu imports) the tiny
preset's train step compiled for a small TPU slice, the CLI's --json line, and RESOURCE_EXHAUSTED as a
result. Without libtpu the compile tests skip and the CLI must say what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3_jax.config import run_preset
from dsv3_jax.errors import InputError
from dsv3_jax.params import train_flops_per_step
from dsv3_jax.pod import topology as topo_lib
from dsv3_jax.pod.hlo import collective_bytes, collective_report
from dsv3_jax.pod.topology import parse_topology

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(not topo_lib.libtpu_available(), reason="libtpu is not installed")


@pytest.mark.parametrize("name,chips,devices,libtpu", [
    ("v5p-1024", 512, 512, "v5:8x8x8"), ("v5p-8", 4, 4, "v5:2x2x1"), ("v4-128", 64, 64, "v4:4x4x4"),
    ("v5e-256", 256, 256, "v5e:16x16"), ("v6e-8", 8, 8, "v6e:2x4"), ("tpu7x-256", 128, 256, "tpu7x:4x4x8"),
    ("v5:8x8x8", 512, 512, "v5:8x8x8"), ("tpu7x:4x4x8", 128, 256, "tpu7x:4x4x8")])
def test_topology_names(name, chips, devices, libtpu):
    """Cloud TPU names count TensorCores for v4/v5p/tpu7x, chips for v5e/v6e; raw names are shapes."""
    t = parse_topology(name)
    assert (t.chips, t.num_devices, t.libtpu_name) == (chips, devices, libtpu)


@pytest.mark.parametrize("name", ["v5p-1000", "v9-8", "v5p-7", "v5:8x8", "nonsense"])
def test_bad_topology_names_say_what_is_accepted(name):
    with pytest.raises(InputError):
        parse_topology(name)


def test_collective_bytes_counts_loop_bodies_by_trip_count():
    """An all-gather in a while body with known_trip_count 3, an async all-reduce (its -done half counted once),
    an all-to-all in the entry: bytes are result bytes times executions."""
    hlo = """HloModule m
%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %ag = bf16[4,8]{1,0} all-gather(bf16[2,8]{1,0} %x), dimensions={0}
}
%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %c = pred[] constant(true)
}
ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[], bf16[4,8]) while((s32[], bf16[4,8]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ars = f32[16]{0} all-reduce-start(f32[16]{0} %a), to_apply=%add
  %ard = f32[16]{0} all-reduce-done(f32[16]{0} %ars)
  ROOT %a2a = f32[16]{0} all-to-all(f32[16]{0} %ard), dimensions={0}
}
"""
    got = collective_bytes(hlo)
    assert got["all-gather"] == 3 * 4 * 8 * 2
    assert got["all-reduce"] == 16 * 4 and got["all-to-all"] == 16 * 4 and got["reduce-scatter"] == 0


TPU_STYLE_LOOPS = """HloModule m
%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(STEP)
  %ic = s32[] copy(%i)
  %next = s32[] add(COUNTER, %one)
  %x = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[4,8]{1,0} all-gather(%x), dimensions={0}
  ROOT %t = (s32[], bf16[4,8]) tuple(%next, %ag)
}
%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %p = (s32[], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%rbody (p: (s32[], s32[])) -> (s32[], s32[]) {
  %p = (s32[], s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[16]{0} constant({...})
  %ar = f32[16]{0} all-reduce(%x), to_apply=%add
  %n = s32[] get-tuple-element(%p), index=1
  ROOT %t = (s32[], s32[]) tuple(%next, %n)
}
%rcond (p: (s32[], s32[])) -> pred[] {
  %p = (s32[], s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
ENTRY %main (a: bf16[4,8], n: s32[]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %n = s32[] parameter(1)
  %zero = s32[] constant(START)
  %start = s32[] copy(%zero)
  %t = (s32[], bf16[4,8]) tuple(%start, %a)
  %w = (s32[], bf16[4,8]) while(%t), condition=%cond, body=%body
  %rt = (s32[], s32[]) tuple(%zero, %n)
  %rw = (s32[], s32[]) while(%rt), condition=%rcond, body=%rbody
  %r = bf16[64,8]{1,0} ragged-all-to-all(%a, %a, %n, %n, %n, %n)
  ROOT %out = bf16[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("start,step,trips", [(0, 1, 12), (2, 1, 10), (0, 5, 3), (0, 12, 1), (12, 1, 0)])
@pytest.mark.parametrize("counter", ["%i", "%ic"])
def test_collective_bytes_reads_trip_counts_from_the_loop_when_the_backend_has_no_annotation(start, step, trips,
                                                                                             counter):
    """XLA:TPU writes no known_trip_count: a loop `i < 12` from a constant start (through a copy) by a constant
    step (added to the counter or to a copy of it, as XLA:TPU does when it moves the counter between memory
    spaces) runs ceil((12 - start) / step) times; a loop to a runtime bound is counted once and reported;
    ragged-all-to-all is counted by its receive buffer."""
    hlo = TPU_STYLE_LOOPS.replace("START", str(start)).replace("STEP", str(step)).replace("COUNTER", counter)
    got, uncounted, largest, _ = collective_report(hlo, top=2)
    assert got["all-gather"] == trips * 4 * 8 * 2
    assert got["all-reduce"] == 16 * 4 and uncounted == 1
    assert got["ragged-all-to-all"] == 64 * 8 * 2 and got["all-to-all"] == 0
    assert collective_bytes(hlo) == got
    # the largest sources, each instruction's bytes times its executions
    expected = sorted([("all-gather", trips, trips * 64), ("ragged-all-to-all", 1, 1024), ("all-reduce", 1, 64)],
                      key=lambda x: -x[2])[:2]
    assert [(c["kind"], c["executions"], c["bytes"]) for c in largest] == expected


def test_report_lists_the_collectives_and_what_it_could_not_count():
    """The text report: every kind in GiB (ragged-all-to-all marked as its buffers), the loops counted once,
    and one line per largest source with its executions and the model code (transform wrappers dropped)."""
    from dsv3_jax.pod.plan import format_report
    gib = 1 << 30
    r = {"topology": "v5p-8", "libtpu_topology": "v5:2x2x1", "chips": 4, "devices": 4, "hbm_bytes_per_device": 95 * gib,
         "mesh": {}, "global_batch": 8, "seq_len": 64, "tokens_per_device": 128, "options": {}, "fits": True,
         "collective_bytes": {"all-gather": 3 * gib, "ragged-all-to-all": 2 * gib}, "collective_loops_uncounted": 5,
         "collective_link_bytes": {"all-gather": 3 * gib * 3 // 4, "ragged-all-to-all": 0},
         "top_collectives": [{"kind": "all-gather", "shape": "bf16[4,8]", "executions": 12, "bytes": 3 * gib,
                              "group": 4,
                              "op_name": "jit(train_step)/while/body/closed_call/Transformer.trunk/moe_layers/while/"
                                         "body/checkpoint/layers/moe/routed_experts/shard_map/all_gather"}]}
    lines = format_report(r).splitlines()
    assert lines[-3] == ("collective bytes per device per step (GiB): all-gather 3.0, ragged-all-to-all 2.0 "
                         "(receive buffers: at most) (5 loops of data-dependent length counted once)")
    assert lines[-2] == "bytes a device sends, ring model (GiB): all-gather 2.2; total 2.2"
    assert lines[-1] == "  3.0 GiB: all-gather over 4 bf16[4,8] x 12  layers/moe/routed_experts/all_gather"


RING_HLO = """HloModule m, num_partitions=32
%all-reduce-scatter.3 (p: f32[8,16]) -> f32[2,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(%p), replica_groups=[8,4]<=[32], to_apply=%add
  ROOT %ds = f32[2,16]{1,0} dynamic-slice(%ar, %i, %j), dynamic_slice_sizes={2,16}
}
ENTRY %main (a: f32[2,16]) -> f32[8,16] {
  %a = f32[2,16]{1,0} parameter(0)
  %ag = f32[8,16]{1,0} all-gather(%a), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ag2 = f32[16,16]{1,0} all-gather(%a), replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=8] {'axis_2'}, dimensions={0}
  %ar = f32[8,16]{1,0} all-reduce(%ag), replica_groups=mesh['axis_0'=4,'axis_1'=8] {'axis_0','axis_1'}, to_apply=%add
  %ar1 = f32[8,16]{1,0} all-reduce(%ag), replica_groups={{0},{1}}, to_apply=%add
  %rs = f32[2,16]{1,0} fusion(%ar), kind=kOutput, calls=%all-reduce-scatter.3
  %cp = f32[8,16]{1,0} collective-permute(%ar), source_target_pairs={{0,1},{1,0}}
  ROOT %all = f32[8,16]{1,0} all-reduce(%cp), to_apply=%add
}
"""


def test_link_bytes_follow_the_ring_model_in_each_replica_group():
    """The bytes a device sends per collective, from its group size in each form XLA prints (explicit lists,
    iota `[groups,size]<=`, and mesh axes with the group's axes after them; none: every device of the module):
    all-gather (g-1)/g of the result, all-reduce 2(g-1)/g, reduce-scatter (XLA:TPU's fusion, its group read
    from the all-reduce inside) g-1 results, a group of one nothing. The result bytes stay as they were."""
    got, _, top, link = collective_report(RING_HLO, top=10)
    b = 8 * 16 * 4                                   # one f32[8,16]
    gathers = {t["shape"].strip(): t["group"] for t in top if t["kind"] == "all-gather"}
    assert gathers == {"f32[8,16]": 4, "f32[16,16]": 8}
    assert link["all-gather"] == int(b * 3 / 4 + 2 * b * 7 / 8)
    assert link["all-reduce"] == int(b * 2 * 31 / 32 * 2)          # the mesh form (4 x 8) and the module's 32
    assert link["reduce-scatter"] == int(b / 4 * 3) and got["reduce-scatter"] == b // 4
    assert link["collective-permute"] == b and got["all-reduce"] == 3 * b


@needs_libtpu
@pytest.mark.slow
def test_microbatch_loop_collectives_are_counted_per_microbatch_on_tpu():
    """The tiny step for v5p-8 (expert=4) at 2 and 4 microbatches of one global batch: the expert dispatch
    moves the batch's tokens either way (ragged-all-to-all bytes equal), while the weights are all-gathered
    and the gradients reduce-scattered once per microbatch (twice the bytes at 4). Before the loop's trip count
    was read from the loop, all four counts came out per microbatch (halving the dispatch at 4)."""
    from dsv3_jax.pod.plan import plan_one
    topo = parse_topology("v5p-8")
    rows = {}
    for mb in (2, 4):
        rc = run_preset("tiny").override(["mesh.data=1", "mesh.expert=4", "model.num_hidden_layers=2",
                                          "train.global_batch_size=16", "train.seq_len=64",
                                          f"train.microbatches={mb}"])
        report = plan_one(rc, topo)
        rows[mb] = report["collective_bytes"]
        top = report["top_collectives"]
        assert top and [t["bytes"] for t in top] == sorted((t["bytes"] for t in top), reverse=True)
        assert all(t["bytes"] <= rows[mb][t["kind"]] for t in top)
        # the largest (an all-gather of weights, the dispatch) run in every microbatch
        assert top[0]["executions"] >= mb and top[0]["op_name"].startswith("jit(train_step)/while")
    assert rows[2]["ragged-all-to-all"] > 0
    assert rows[4]["ragged-all-to-all"] == rows[2]["ragged-all-to-all"]
    assert rows[4]["all-gather"] == pytest.approx(2 * rows[2]["all-gather"], rel=0.05)
    assert rows[4]["reduce-scatter"] == pytest.approx(2 * rows[2]["reduce-scatter"], rel=0.05)


@needs_libtpu
@pytest.mark.slow
def test_resource_exhausted_is_a_result_not_a_crash():
    """A batch far beyond v5e's 16 GiB: fits false, the compiler's figures kept."""
    from dsv3_jax.config import run_preset
    from dsv3_jax.pod.plan import plan_one
    rc = run_preset("tiny").override(["mesh.data=4", "train.global_batch_size=4096", "train.seq_len=1024",
                                      "model.moe_impl=dense"])
    r = plan_one(rc, parse_topology("v5e-4"))
    assert r["oom"] and not r["fits"] and "RESOURCE_EXHAUSTED" in r["error"]
    assert r["bytes_per_device"] > r["hbm_bytes_per_device"]


@needs_libtpu
def test_fsdp_weights_are_gathered_in_two_stages_on_a_tpu_slice():
    """The tiny step with zero3 + FSDP for v5p-64 (data 4 x expert 8): read in one collective over all 32
    devices (mesh.staged_gather=false), XLA:TPU gathers the weights by all-reduce (zero-padded shards) and
    all-reduces their gradients in full; staged (the default: over expert, then data) the gathers are
    all-gathers and the gradients are reduce-scattered over data. The ring model's all-reduce bytes fall by
    more than a quarter (measured 0.58x) and the total by more than 5% (0.86x), so either change shows."""
    from dsv3_jax.pod.plan import plan_one
    link = {}
    for staged in ("true", "false"):
        rc = run_preset("tiny").override(["mesh.data=4", "mesh.expert=8", "mesh.zero3=true", "mesh.fsdp=true",
                                          "model.num_hidden_layers=2", "train.global_batch_size=32",
                                          "train.seq_len=64", "model.moe_impl=dense", f"mesh.staged_gather={staged}"])
        link[staged] = plan_one(rc, parse_topology("v5p-64"))["collective_link_bytes"]
    assert link["true"]["all-reduce"] < 0.75 * link["false"]["all-reduce"], link
    assert sum(link["true"].values()) < 0.95 * sum(link["false"].values()), link


def _plan_cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "dsv3_jax", "plan", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@needs_libtpu
@pytest.mark.parametrize("argv,message", [
    (["--mesh", "foo"], "--mesh 'foo': use data=N,expert=N,tensor=N"),
    (["--step", "decode", "--batch", "0"], "--batch 0: serve at least one sequence"),
    (["--step", "decode", "--context", "-5"], "--context -5: cached positions run from 1 to the model's"),
    (["--step", "decode", "--batch", "6", "--json"], "--batch 6 does not split over the 4 devices of v5p-8: give "
                                                     "--batch a multiple of 4")])
def test_impossible_plans_are_refused_before_anything_compiles(argv, message, capsys):
    """In process (each fails before a TPU device is made): exit 2 and the reason. Before, --mesh foo raised
    outside the CLI's error handling, --batch 0 planned the default batch instead, a negative context failed
    inside JAX, and a batch no slice could split ended in an IndexError."""
    from dsv3_jax.__main__ import main
    assert main(["plan", "--preset", "tiny", "--topology", "v5p-8", "--no-save", *argv]) == 2
    assert message in capsys.readouterr().err


@needs_libtpu
def test_a_mesh_that_does_not_cover_the_slice_is_refused():
    """The real CLI: `--mesh data=3` on v5p-8's 4 devices names the mismatch and exits 2 (it ended in an
    IndexError after printing the problem as a skipped search setup)."""
    p = _plan_cli("--preset", "tiny", "--topology", "v5p-8", "--mesh", "data=3", "--no-save")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "has 3 devices, but there are 4" in p.stderr and "Traceback" not in p.stderr


@needs_libtpu
def test_decode_plan_reports_the_served_batch_and_context():
    """`plan --step decode` on the tiny preset for v5p-8: the row names the served batch and context (it named
    the train config's 16 x 256 before, and plan.json keyed the row by them), and the tokens per device and
    model FLOPs follow from them."""
    from dsv3_jax.params import decode_flops_per_step
    p = _plan_cli("--preset", "tiny", "--topology", "v5p-8", "--step", "decode", "--batch", "8", "--context", "64",
                  "--json", "--no-save")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert (r["step"], r["global_batch"], r["seq_len"], r["tokens_per_device"]) == ("decode", 8, 64, 8 * 64 // 4)
    assert "global batch 8 x 64" in p.stdout and r["fits"]
    assert r["flops_per_device"] == pytest.approx(decode_flops_per_step(run_preset("tiny").model, 8, 64) / 4)


@needs_libtpu
def test_decode_plan_weights_layouts_trade_memory_for_gathers():
    """`plan --step decode --layout`: with fsdp the non-expert weights are split over v5p-8's 4 devices (a
    quarter of the replicated bytes for those leaves) and gathered at every step; replicated holds them
    whole and gathers no weights (what is left is the expert dispatch and the batch's)."""
    rows = {}
    for layout in ("fsdp", "replicated"):
        p = _plan_cli("--preset", "tiny", "--topology", "v5p-8", "--step", "decode", "--batch", "8", "--context",
                      "64", "--layout", layout, "--json", "--no-save")
        assert p.returncode == 0, p.stderr[-3000:]
        rows[layout] = json.loads(p.stdout.strip().splitlines()[-1])
        assert rows[layout]["layout"] == layout and rows[layout]["fits"]
        assert f"--layout {layout}" in p.stdout
    fsdp, rep = rows["fsdp"], rows["replicated"]
    assert (fsdp["options"]["fsdp"], rep["options"]["fsdp"]) == (True, False)
    assert fsdp["params_bytes"] < 0.6 * rep["params_bytes"], (fsdp["params_bytes"], rep["params_bytes"])
    gathered = {k: (r["collective_bytes"] or {}).get("all-gather", 0) for k, r in rows.items()}
    assert gathered["fsdp"] > 0.5 * (rep["params_bytes"] - fsdp["params_bytes"]), gathered
    assert gathered["replicated"] < 0.05 * gathered["fsdp"], gathered


@needs_libtpu
def test_tiny_train_step_compiles_for_a_tpu_slice_through_the_cli():
    """`plan --json` on the tiny preset's real train step (zero3 + FSDP, blocked attention, bf16 moments)
    for v5p-8's 4 compile-only devices: the JSON line has the issue's keys, it fits, the memory split adds
    up (bf16 moments: optimizer state = params), FLOPs and the data-parallel collectives show."""
    p = _plan_cli("--preset", "tiny", "--topology", "v5p-8", "--mesh", "data=2,expert=2", "--json", "--no-save",
                  "mesh.zero3=true", "mesh.fsdp=true", "model.attention_impl=blocked", "model.num_hidden_layers=2",
                  "train.moment_dtype=bfloat16", "train.global_batch_size=8", "train.seq_len=64",
                  "model.moe_impl=dense")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("topology", "chips", "devices", "mesh", "tokens_per_device", "bytes_per_device",
                "hbm_bytes_per_device", "fits", "flops_per_device", "compile_s"):
        assert key in r, key
    assert (r["topology"], r["chips"], r["devices"]) == ("v5p-8", 4, 4)
    assert r["mesh"] == {"data": 2, "expert": 2, "tensor": 1} and r["tokens_per_device"] == 8 * 64 // 4
    assert r["fits"] is True and not r["oom"] and 0 < r["bytes_per_device"] < r["hbm_bytes_per_device"]
    assert r["params_bytes"] > 0 and r["opt_state_bytes"] == pytest.approx(r["params_bytes"], rel=0.01)
    assert r["argument_bytes"] >= r["params_bytes"] + r["opt_state_bytes"] + r["batch_bytes"]
    assert r["flops_per_device"] > 0 and r["collective_bytes"]["all-gather"] > 0
    # the model FLOPs (params.py) of the 8 x 64-token step, split over 4 devices; XLA's own figure kept beside
    assert r["flops_per_device"] == pytest.approx(train_flops_per_step(run_preset("tiny").override(
        ["model.num_hidden_layers=2"]).model, 8, 64) / 4, rel=1e-9) and r["xla_flops_per_device"] > 0
    # fits is decided by the peak of the HBM heap the compiler lays out (what it checks for RESOURCE_EXHAUSTED):
    # it holds the arguments and is at most the sum of every allocation that memory_analysis() reports
    assert r["bytes_per_device"] == r["peak_bytes"]
    assert r["argument_bytes"] <= r["peak_bytes"] <= r["memory_analysis_bytes"]


def test_missing_libtpu_is_one_line_saying_what_to_install(monkeypatch, capsys):
    from dsv3_jax.__main__ import main
    monkeypatch.setattr(topo_lib, "libtpu_available", lambda: False)
    import dsv3_jax.pod.plan as plan_lib
    monkeypatch.setattr(plan_lib, "libtpu_available", lambda: False)
    assert main(["plan", "--topology", "v5p-8", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libtpu" in err[0] and "pip install" in err[0]


def test_recommended_setups_and_search_space_are_valid_configs():
    """No compile: the recommended v5p-1024 / tpu7x-256 setups build valid configs with >= 16,384 tokens per
    device and one sequence per device per microbatch; --search's candidates come most tokens first."""
    from dsv3_jax.config import run_preset
    from dsv3_jax.pod.plan import recommended, search_space
    base = run_preset("v3-671b")
    for name in ("v5p-1024", "tpu7x-256"):
        t = parse_topology(name)
        rc = base.override(recommended(base, t))
        assert rc.mesh.data * rc.mesh.expert * rc.mesh.tensor == t.num_devices
        assert rc.train.global_batch_size * rc.train.seq_len // t.num_devices >= 16384
        assert rc.train.global_batch_size // rc.train.microbatches == t.num_devices
        assert rc.mesh.fsdp and rc.train.moment_dtype == "bfloat16" and rc.model.attention_impl == "blocked"
    space = search_space(base, parse_topology("v5p-1024"))
    tokens = [base.override(o).train.global_batch_size for o in space]
    assert tokens == sorted(tokens, reverse=True) and len(space) > 8


def test_a_rows_command_names_each_option_once_with_the_value_that_applied():
    """Rerunning a plan.md row's command puts the recommended setup in front of the same options: the row's
    new command still names each key once, where it first appeared, with the value that applied (the
    last), and it plans the same config."""
    import argparse
    from dsv3_jax.config import run_preset
    from dsv3_jax.pod.plan import _command, recommended
    base = run_preset("v3-671b")
    rec = recommended(base, parse_topology("v5p-1024"))
    given = rec + rec + ["train.microbatches=24"]
    cmd = _command(argparse.Namespace(preset="v3-671b", topology="v5p-1024"), given)
    prefix = "python -m dsv3_jax plan --preset v3-671b --topology v5p-1024 "
    assert cmd.startswith(prefix)
    options = cmd[len(prefix):].split(" ")
    keys = [o.partition("=")[0] for o in options]
    assert keys == [o.partition("=")[0] for o in rec]
    assert "train.microbatches=24" in options
    assert base.override(options) == base.override(given)


@pytest.mark.slow
@needs_libtpu
def test_offload_inputs_puts_the_layer_inputs_in_host_memory_on_tpu():
    """`model.remat_policy=offload_inputs` compiled for a TPU slice: the layer inputs that `full` keeps in HBM
    go to pinned host memory (memory_analysis' host temporaries, the JSON's host_temp_bytes: at least the fp32
    inputs of every layer this device's rows pass through), and `full` has none."""
    cfg = run_preset("tiny").model
    host = {}
    for policy in ("full", "offload_inputs"):
        p = _plan_cli("--preset", "tiny", "--topology", "v5p-8", "--mesh", "data=2,expert=2", "--json", "--no-save",
                      "model.num_hidden_layers=2", "train.global_batch_size=8", "train.seq_len=64",
                      "model.moe_impl=dense", f"model.remat_policy={policy}")
        assert p.returncode == 0, p.stderr[-3000:]
        host[policy] = json.loads(p.stdout.strip().splitlines()[-1])["host_temp_bytes"]
    layer_inputs = 2 * (8 // 4) * 64 * cfg.hidden_size * 4       # 2 layers x 2 rows per device x 64 x D, fp32
    assert host["full"] == 0 and host["offload_inputs"] >= layer_inputs, (host, layer_inputs)
