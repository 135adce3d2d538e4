"""`python -m dsv3_jax generate`: load a run directory (or an HF checkpoint), stream generated text to
stdout, statistics to stderr; or, with --prompts-file, serve a file of prompts through the queue's batch
slots (queue.py) and print one JSON line per prompt."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from typing import Optional

import jax

from ..config import ModelConfig
from ..errors import InputError, MissingInputError


GENERATE_DTYPES = ("float32", "bfloat16")
# Where the weights other than the routed experts live on a mesh (experts are split over `expert` either way):
#   replicated  each device holds them all (split over `tensor` only): no weight traffic per token;
#   fsdp        split over every device as in training with zero3 + fsdp, gathered where each is read: fits
#               a smaller slice, and pays those gathers at every step (docs/scaling.md, "Serving").
SERVING_LAYOUTS = ("replicated", "fsdp")
DEFAULT_SLOTS = 8                      # --prompts-file's batch slots when --batch-size is not given


def with_dtype(cfg: ModelConfig, variables, dtype: Optional[str]):
    """(cfg, variables) computing and storing in `dtype` (None: unchanged). Every parameter is cast except the
    router and its bias, which stay fp32 whatever the dtype (arXiv 2412.19437, sections 2.1.2 and 3.3.2); the
    latent cache follows cfg.dtype. bf16 halves the weights' memory and the cache's."""
    if dtype is None:
        return cfg, variables
    if dtype not in GENERATE_DTYPES:
        raise InputError(f"--dtype {dtype!r}: use one of {', '.join(GENERATE_DTYPES)}")
    from flax import traverse_util
    from ..hf_layout import leaf_dtype
    from ..safetensors_io import np_dtype
    flat = traverse_util.flatten_dict(variables)
    flat = {k: v.astype(leaf_dtype(k, np_dtype(dtype))) for k, v in flat.items()}
    return dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype), traverse_util.unflatten_dict(flat)


def load_run(run_dir: str, mesh=None, dtype: Optional[str] = None, layout: str = "replicated"):
    """(model config, variables, tokenizer) from the newest good checkpoint of a training run: params and
    router state only (the optimizer state is never read), placed on `mesh` (default: one device) in the
    serving `layout`, in `dtype` (None: the run's own; see `with_dtype`). The checksums are checked on the
    saved dtype."""
    from ..data import load_tokenizer
    from ..runs import restore_variables
    fsdp = _is_fsdp(layout)
    rc, _, variables = restore_variables(run_dir, mesh, zero3=fsdp, fsdp=fsdp)
    cfg, variables = with_dtype(rc.model, variables, dtype)
    return cfg, variables, load_tokenizer(rc.train.tokenizer)


def load_hf(hf_dir: str, mesh=None, dtype: Optional[str] = None, layout: str = "replicated"):
    """(model config, variables, tokenizer) of an HF checkpoint directory, sharded onto `mesh` if given (in
    the serving `layout`), read straight into `dtype` (None: float32; the router stays fp32)."""
    from ..hf import load_checkpoint
    from ..safetensors_io import np_dtype
    tokenizer = _hf_tokenizer(hf_dir)
    if dtype is not None and dtype not in GENERATE_DTYPES:
        raise InputError(f"--dtype {dtype!r}: use one of {', '.join(GENERATE_DTYPES)}")
    fsdp = _is_fsdp(layout)
    cfg, variables = load_checkpoint(hf_dir, dtype=np_dtype(dtype or "float32"), mesh=mesh, zero3=fsdp, fsdp=fsdp)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    return cfg, variables, tokenizer


def _hf_tokenizer(hf_dir: str):
    from ..data import load_tokenizer
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise MissingInputError(f"{hf_dir} has no tokenizer.json")
    return load_tokenizer(path)


def _is_fsdp(layout: str) -> bool:
    if layout not in SERVING_LAYOUTS:
        raise InputError(f"--layout {layout!r}: use one of {', '.join(SERVING_LAYOUTS)}")
    return layout == "fsdp"


def generation_rules(mesh, batch: int, layout: str = "replicated") -> tuple:
    """The training rules of the serving `layout` (fsdp: those of zero3 + fsdp), except that a batch the
    data x expert axes cannot split evenly (one prompt, say) is replicated: weights stay sharded, and so does
    the latent cache whenever its rows can be."""
    from ..sharding import logical_rules
    shards = mesh.shape["data"] * mesh.shape["expert"]
    fsdp = _is_fsdp(layout)
    return tuple((name, None if name == "batch" and batch % shards else axes)
                 for name, axes in logical_rules(zero3=fsdp, fsdp=fsdp))


class TextStream:
    """Turns streamed token ids into text as soon as it is complete (bytes may split a UTF-8 character)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.byte_level = getattr(tokenizer, "vocab_size", 0) == 256
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new_tokens_per_row) -> None:
        new = [int(t) for t in new_tokens_per_row[0]]
        if self.byte_level:
            text = self.decoder.decode(bytes(t for t in new if t < 256))
        else:
            self.ids += new
            full = self.tokenizer.decode(self.ids)
            text, self.printed = full[len(self.printed):], full
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        if self.byte_level:
            self.out.write(self.decoder.decode(b"", final=True))
        self.out.write("\n")
        self.out.flush()


def read_prompts(path: str) -> list[tuple[int, str]]:
    """The prompts of a --prompts-file: its non-blank lines, without their line ends, each with its line
    number (from 1), which errors name."""
    if not os.path.isfile(path):
        raise MissingInputError(f"--prompts-file {path}: no such file")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise InputError(f"--prompts-file {path} holds no prompts (every line is blank)")
    return prompts


def model_config_and_tokenizer(run_dir: Optional[str], hf_dir: Optional[str]):
    """(model config, tokenizer) of a run directory or an HF checkpoint, without reading any weights: what the
    CLI checks a request against before the load."""
    if run_dir:
        from ..data import load_tokenizer
        from ..train.checkpoint import load_run_config
        rc = load_run_config(run_dir)
        return rc.model, load_tokenizer(rc.train.tokenizer)
    from ..config import load_hf_config
    return load_hf_config(hf_dir), _hf_tokenizer(hf_dir)


def _check_speculative(speculative: bool, cfg: ModelConfig) -> None:
    if speculative and cfg.num_nextn_predict_layers < 1:
        raise InputError("--speculative needs the MTP module, and this checkpoint has none "
                         "(num_nextn_predict_layers is 0, or transformers' save_pretrained dropped the layer): "
                         "generate without --speculative")


def run_generate(args) -> int:
    from .generate import generate, validate_request, validate_sampling
    from .queue import check_batch_size
    from .speculative import check_drafts
    if bool(args.run_dir) == bool(args.hf_dir):
        raise InputError("give exactly one of --run-dir or --hf-dir")
    prompts_file = getattr(args, "prompts_file", None)
    batch_size, drafts = getattr(args, "batch_size", None), getattr(args, "drafts", None)
    if prompts_file and args.prompt is not None:
        raise InputError("give --prompt or --prompts-file, not both")
    if prompts_file:
        numbered = read_prompts(prompts_file)
        texts = [text for _, text in numbered]
        # Prompt i is the output's "index" i; the line helps find it in the file (blank lines are skipped).
        names = [f"prompt {i} (line {n} of {prompts_file})" for i, (n, _) in enumerate(numbered)]
        slots = check_batch_size(DEFAULT_SLOTS if batch_size is None else batch_size)
    elif not args.prompt:
        raise InputError("the prompt is empty: give --prompt some text (or --prompts-file)")
    elif batch_size is not None:
        raise InputError("--batch-size sets the slots that serve a --prompts-file; one --prompt decodes alone")
    else:
        texts, slots, names = [args.prompt], None, ["the prompt"]
    if drafts is not None and not args.speculative:
        raise InputError("--drafts is the number of tokens a speculative step drafts: add --speculative")
    drafts = check_drafts(1 if drafts is None else drafts)
    validate_sampling(args.max_new_tokens, args.temperature, args.top_p)
    mesh, layout = None, getattr(args, "layout", "replicated")
    _is_fsdp(layout)
    if layout != "replicated" and not getattr(args, "mesh", None):
        raise InputError(f"--layout {layout} places the weights on a mesh: give --mesh as well")

    # The config and tokenizer name every remaining problem of the request before any weights are read.
    cfg, tokenizer = model_config_and_tokenizer(args.run_dir, args.hf_dir)
    prompts = [[int(t) for t in tokenizer.encode(text)] for text in texts]
    for name, p in zip(names, prompts):
        if not p:
            raise InputError(f"{name} encodes to no tokens")
    _check_speculative(args.speculative, cfg)
    validate_request(cfg, prompts, args.max_new_tokens, args.temperature, args.top_p, prompt_names=names)
    if getattr(args, "mesh", None):
        from ..config import MeshConfig
        from ..sharding import make_mesh, validate_for_mesh
        mesh = make_mesh(MeshConfig(**args.mesh))
        with warnings.catch_warnings():             # the load below repeats them
            warnings.simplefilter("ignore")
            validate_for_mesh(cfg, mesh)
    dtype = getattr(args, "dtype", None)
    cfg, variables, tokenizer = (load_run(args.run_dir, mesh, dtype, layout) if args.run_dir
                                 else load_hf(args.hf_dir, mesh, dtype, layout))
    _check_speculative(args.speculative, cfg)      # again: an HF load drops an MTP layer its files lack
    quiet = jax.process_index() != 0               # with several processes, process 0 prints
    out = open(os.devnull, "w") if quiet else sys.stdout
    stream = TextStream(tokenizer, out=out) if slots is None else None
    context = contextlib.nullcontext()
    if mesh is not None:
        context = _on_mesh(mesh, generation_rules(mesh, slots or 1, layout))
    with context:
        tokens, stats = generate(cfg, variables, prompts, args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, speculative=args.speculative,
                                 drafts=drafts, stream_callback=stream,
                                 eos_id=getattr(tokenizer, "eos_id", None), batch_size=slots)
    if stream is not None:
        stream.close()
    else:
        for i, (text, new) in enumerate(zip(texts, tokens)):
            out.write(json.dumps({"index": i, "prompt": text, "completion": tokenizer.decode(new),
                                  "new_tokens": len(new)}, ensure_ascii=False) + "\n")
        out.flush()
    if not quiet:
        stats = dict(stats, dtype=cfg.dtype)
        print(json.dumps({k: _rounded(v) for k, v in stats.items()}), file=sys.stderr)
    return 0


def _rounded(v):
    """A stats value for the JSON line: floats (and lists of them, e.g. acceptance_per_prompt) to 4 places."""
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return round(v, 4) if isinstance(v, float) else v


@contextlib.contextmanager
def _on_mesh(mesh, rules):
    """Make `mesh` and these logical rules ambient (as `sharding.activate` does for training)."""
    import flax.linen as nn
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh
