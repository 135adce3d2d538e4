"""Command line: `dsv3-jax {train,generate,params,convert,plan} ...` or `python -m dsv3_jax ...` (see --help of each).

Exit status: 0 done; 2 bad input (an InputError: config, paths, data; one line, no traceback); 1 a run that
failed or stopped with its checkpoints intact (CheckpointError, TrainingStopped). Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import InputError


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                             "JAX_PROCESS_ID environment variables)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def _init_distributed(args) -> None:
    env = os.environ
    coordinator = args.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    import jax
    num = args.num_processes if args.num_processes is not None else int(env.get("JAX_NUM_PROCESSES", "0"))
    pid = args.process_id if args.process_id is not None else int(env.get("JAX_PROCESS_ID", "-1"))
    if num < 1 or not 0 <= pid < num:
        raise InputError(f"--coordinator needs --num-processes N >= 1 and --process-id in [0, N), "
                         f"got {num} and {pid}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)


def _gpu_plugin_installed() -> bool:
    import importlib.metadata
    import pkgutil
    try:
        import jax_plugins
        names = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        names = []
    names += [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    return any(k in n for n in names for k in ("cuda", "rocm", "gpu"))


def _skip_absent_tpu() -> None:
    """With libtpu installed (the `tpu` extra, for `plan`) on a machine without TPU chips, jax would still
    initialise libtpu at its first device query and print its failure to find a TPU (several lines of
    errors) before falling back to CPU. Unless JAX_PLATFORMS names the platforms, such a machine runs on CPU
    without asking libtpu; a machine with a GPU plugin is left to jax. `plan` compiles for TPU through the
    topology API, which needs no TPU backend."""
    import importlib.util
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    try:
        from jax._src import hardware_utils           # private: checked on jax 0.10 (PCI vendor/device ids)
        chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except (ImportError, AttributeError, OSError):
        return
    if chips == 0 and not _gpu_plugin_installed():
        import jax
        jax.config.update("jax_platforms", "cpu")


def _reuse_host_memory_on_cpu(args) -> None:
    """A training run on XLA:CPU restarts once with glibc malloc settings under which each step reuses the
    last step's freed buffers instead of page-faulting fresh ones (dsv3_jax/host_malloc.py). Skipped when an
    accelerator runs the step, when GLIBC_TUNABLES already sets malloc options (the way to opt out), and in a
    multi-process run whose platform is not named by JAX_PLATFORMS (asking jax for its backend would come
    before jax.distributed.initialize)."""
    from . import host_malloc
    if host_malloc.in_effect() or not host_malloc.supported():
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        on_cpu = platforms.split(",")[0].strip() == "cpu"
    elif args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        on_cpu = False
    else:
        import jax
        on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        host_malloc.reuse_freed_memory()


def _parse_mesh(text: str | None) -> list[str]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in ("data", "expert", "tensor"):
            raise InputError(f"--mesh {text!r}: use data=N,expert=N,tensor=N (N may be -1 for the rest)")
        out.append(f"mesh.{name.strip()}={value.strip()}")
    return out


def _mesh_sizes(text: str | None) -> dict | None:
    """`data=2,expert=2,tensor=2` -> {'data': 2, ...} (generate's --mesh)."""
    if not text:
        return None
    sizes = {}
    for item in _parse_mesh(text):
        key, value = item.split("=", 1)
        try:
            sizes[key.split(".", 1)[1]] = int(value)
        except ValueError:
            raise InputError(f"--mesh {text!r}: sizes must be integers, got {value!r}") from None
    return sizes


def cmd_train(args) -> int:
    _init_distributed(args)
    from .config import RunConfig, run_preset
    from .train.checkpoint import load_run_config
    from .train.loop import train
    overrides = list(args.overrides) + _parse_mesh(args.mesh)
    if args.data:
        overrides.append(f"train.data={json.dumps(args.data)}")
    init = None
    if args.init_from:
        from .config import ModelConfig, TrainConfig
        from .errors import InputError
        from .runs import init_from_config, init_variables
        if args.preset is not None:
            raise InputError("--init-from takes the model from the checkpoint's config.json; drop --preset "
                             "(train.* and model.* overrides still apply)")
        if args.resume:
            raise InputError("--init-from starts a new run from the checkpoint; to continue a fine-tune that "
                             "has checkpoints, use --resume without --init-from")
        rc = init_from_config(args.init_from, RunConfig(ModelConfig(), TrainConfig()))
        init = lambda r, mesh, fresh: init_variables(args.init_from, r, mesh, fresh)  # noqa: E731
    elif args.resume and os.path.exists(os.path.join(args.run_dir, "config.json")):
        rc: RunConfig = load_run_config(args.run_dir)   # the saved run, plus what the command line changes
    else:
        rc = run_preset(args.preset or "tiny")
    rc = rc.override(overrides)
    summary = train(rc, args.run_dir, resume=args.resume, progress=not args.no_progress,
                    **({"init_variables": init} if init is not None else {}))
    last = summary.get("last", {})
    print(json.dumps({k: last.get(k) for k in ("step", "loss", "val_loss", "tokens_per_s", "max_vio", "val_max_vio")}))
    return 0


def cmd_params(args) -> int:
    from .config import RunConfig, TrainConfig, load_hf_config, run_preset
    from .params import count_params
    sources = {k: v for k, v in (("preset", args.preset), ("run_dir", args.run_dir), ("hf_dir", args.hf_dir)) if v}
    if len(sources) != 1:
        raise InputError("give exactly one of --preset, --run-dir or --hf-dir")
    other = [o for o in args.overrides if not o.startswith("model.")]
    if other:
        raise InputError(f"params counts the model: only model.FIELD=VALUE overrides apply, not {other[0]!r}")
    if args.preset:
        rc = run_preset(args.preset)
    elif args.run_dir:
        from .train.checkpoint import load_run_config
        rc = load_run_config(args.run_dir)
    else:
        rc = RunConfig(load_hf_config(args.hf_dir), TrainConfig())
    counts = count_params(rc.override(args.overrides).model)
    if args.json:
        print(json.dumps({**sources, **({"overrides": args.overrides} if args.overrides else {}), **counts}))
    else:
        for k, v in counts.items():
            print(f"{k:>28}: {v / 1e9:10.3f} B  ({v:,})")
    return 0


def cmd_plan(args) -> int:
    from .pod.plan import run_plan
    args.mesh = _parse_mesh(args.mesh)
    return run_plan(args)


def cmd_generate(args) -> int:
    from .infer.cli import run_generate
    _init_distributed(args)
    args.mesh = _mesh_sizes(args.mesh)
    return run_generate(args)


def cmd_convert(args) -> int:
    """A run's newest checkpoint, or an HF directory (e.g. FP8 -> bf16), -> an HF checkpoint directory."""
    from .errors import InputError
    if bool(args.run_dir) == bool(args.hf_dir):
        raise InputError("give exactly one of --run-dir or --hf-dir")
    if args.run_dir:
        from .runs import export_run
        step = export_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {args.out} (step {step} of {args.run_dir})")
        return 0
    from .runs import convert_hf
    convert_hf(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    prog = "dsv3-jax" if os.path.basename(sys.argv[0]) == "dsv3-jax" else "python -m dsv3_jax"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a preset; key=value overrides any config field",
                       epilog=f"example: {prog} train --preset tiny --run-dir runs/tiny "
                              "model.n_routed_experts=16 train.steps=200")
    t.add_argument("--preset", default=None, help="default: tiny")
    t.add_argument("--run-dir", default=None, help="default: runs/<preset>")
    t.add_argument("--data", help="text file, folder, .npy or .bin tokens (default: the embedded corpus)")
    t.add_argument("--mesh", help="e.g. data=2,expert=2,tensor=2")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--init-from", metavar="HF_DIR", help="fine-tune released weights: model config, params and "
                   "router biases from an HF DeepSeek-V3 directory (fresh optimizer; its tokenizer.json if any)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", metavar="section.field=value")
    _add_distributed(t)
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="generate text from a run directory or an HF checkpoint")
    g.add_argument("--run-dir")
    g.add_argument("--hf-dir")
    g.add_argument("--prompt", help="the text to continue (streamed to stdout)")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="one prompt per line (blank lines skipped), served through --batch-size slots; one JSON "
                   "line per prompt to stdout, in the file's order")
    g.add_argument("--batch-size", type=int, default=None,
                   help="with --prompts-file: batch slots of the serving queue, each refilled with the next prompt "
                   "as soon as its request is done (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--speculative", action="store_true", help="MTP module 1 drafts, the main model verifies")
    g.add_argument("--drafts", type=int, default=None,
                   help="with --speculative: tokens drafted per step, 1-3 (MTP module 1 chained on its own output)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights, compute and latent cache in this dtype (the router stays fp32); default: the "
                   "run's own dtype, float32 for an HF checkpoint. bfloat16 halves the memory")
    g.add_argument("--mesh", help="e.g. data=2,expert=2,tensor=2: weights and latent cache sharded by the "
                   "training rules (default: one device)")
    g.add_argument("--layout", choices=["replicated", "fsdp"], default="replicated",
                   help="with --mesh, the weights other than the routed experts: replicated (no weight traffic per "
                   "token) or fsdp (split over every device and gathered where read: fits a smaller slice; see "
                   "`plan --step decode`)")
    _add_distributed(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("params", help="parameter counts from the model's abstract init (no weights are read)",
                       epilog=f"example: {prog} params --preset v3-671b model.num_hidden_layers=8 --json")
    c.add_argument("--preset")
    c.add_argument("--run-dir", help="a training run's model (its config.json)")
    c.add_argument("--hf-dir", help="an HF DeepSeek-V3 directory's model (its config.json)")
    c.add_argument("--json", action="store_true")
    c.add_argument("overrides", nargs="*", metavar="model.field=value")
    c.set_defaults(fn=cmd_params)

    v = sub.add_parser("convert", help="export a run's newest checkpoint, or re-save an HF checkpoint, as an HF "
                       "DeepSeek-V3 directory")
    v.add_argument("--run-dir", help="a training run (params and router biases; no optimizer state is read)")
    v.add_argument("--hf-dir", help="an HF DeepSeek-V3 directory (e.g. FP8 -> bfloat16)")
    v.add_argument("--out", required=True, help="a new or empty directory; written whole or not at all")
    v.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier HF export "
                   "(never a training run or the checkpoint being converted)")
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "fp8"],
                   help="default: bfloat16 for --run-dir, float32 for --hf-dir")
    v.set_defaults(fn=cmd_convert)

    pl = sub.add_parser("plan", help="compile a step for a TPU slice ahead of time (libtpu): memory, FLOPs, fit",
                        epilog="example: python -m dsv3_jax plan --preset v3-671b --topology v5p-1024 --json")
    pl.add_argument("--preset", default="v3-671b")
    pl.add_argument("--topology", required=True, help="v5p-1024, v5e-256, v6e-256, v4-128, tpu7x-256 or v5:8x8x8")
    pl.add_argument("--mesh", help="e.g. data=64,expert=8,tensor=1 (default: the recommended setup)")
    pl.add_argument("--step", default="train", choices=["train", "decode"])
    pl.add_argument("--batch", type=int, help="decode: sequences per step (default: a recommended batch)")
    pl.add_argument("--context", type=int, help="decode: cached positions per sequence (default: 32768, or the "
                    "model's max_position_embeddings if fewer)")
    pl.add_argument("--layout", choices=["fsdp", "replicated"], default="fsdp",
                    help="decode: the weights other than the routed experts split over every device (fsdp: the "
                    "smallest slice) or replicated (no weight gathers per step); generate --layout")
    pl.add_argument("--search", action="store_true", help="try meshes, remat, microbatches, optimizer dtypes")
    pl.add_argument("--json", action="store_true", help="the last line is one JSON object")
    pl.add_argument("--no-save", action="store_true", help="do not update experiments/results/plan.{md,json}")
    pl.add_argument("overrides", nargs="*", metavar="section.field=value")
    pl.set_defaults(fn=cmd_plan)

    # Overrides may come after flags (`train --resume train.steps=20`): argparse leaves those as extras.
    args, extra = p.parse_known_args(argv)
    if extra and not (args.command in ("train", "plan") and all("=" in x and not x.startswith("-") for x in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("train", "plan"):
        args.overrides = list(args.overrides) + extra
    if argv is None:                                  # a program of its own (never a caller's process)
        _skip_absent_tpu()
    if args.command == "train" and argv is None:
        _reuse_host_memory_on_cpu(args)
    if args.command == "train" and args.run_dir is None:
        args.run_dir = os.path.join("runs", args.preset or ("finetune" if args.init_from else "tiny"))
    if args.command == "convert" and args.dtype is None:
        args.dtype = "bfloat16" if args.run_dir else "float32"
    try:
        return args.fn(args)
    except InputError as e:                   # bad input: config, paths, unreadable files, data (exit 2)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:                 # the run itself failed or stopped, its checkpoints intact (exit 1)
        from .train.checkpoint import CheckpointError
        from .train.loop import TrainingStopped
        if not isinstance(e, (CheckpointError, TrainingStopped)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
