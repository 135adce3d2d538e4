"""`python -m dsv3_jax generate`: load a run directory (or an HF checkpoint), stream generated text to
stdout, statistics to stderr."""

from __future__ import annotations

import codecs
import json
import os
import sys

import jax

from ..config import ModelConfig


def load_run(run_dir: str):
    """(model config, variables, tokenizer) from the newest good checkpoint of a training run."""
    from ..data import load_tokenizer
    from ..model import Transformer
    from ..sharding import make_mesh
    from ..config import MeshConfig
    from ..train.checkpoint import Checkpointer, load_run_config
    from ..train.optimizer import make_optimizer
    from ..train.state import state_shardings

    rc = load_run_config(run_dir)           # names the problem if the directory is not a run
    ckpt = Checkpointer(run_dir)
    if not ckpt.all_steps():
        raise FileNotFoundError(f"{run_dir} has no finished checkpoint yet")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    abstract, shardings = state_shardings(Transformer(rc.model), rc, mesh, make_optimizer(rc.train))
    try:
        _, state, _ = ckpt.restore(abstract, shardings)
    finally:
        ckpt.close()
    return rc.model, {"params": state.params, "router_state": state.router_state}, load_tokenizer(rc.train.tokenizer)


def load_hf(hf_dir: str):
    from ..data import load_tokenizer
    from ..hf import load_checkpoint
    cfg, variables = load_checkpoint(hf_dir)
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json")
    return cfg, variables, load_tokenizer(tok_path)


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


def run_generate(args) -> int:
    from .generate import generate
    if bool(args.run_dir) == bool(args.hf_dir):
        raise ValueError("give exactly one of --run-dir or --hf-dir")
    if not args.prompt:
        raise ValueError("the prompt is empty: give --prompt some text")
    cfg: ModelConfig
    cfg, variables, tokenizer = load_run(args.run_dir) if args.run_dir else load_hf(args.hf_dir)
    prompt = [int(t) for t in tokenizer.encode(args.prompt)]
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    if args.speculative and cfg.num_nextn_predict_layers < 1:
        raise ValueError("--speculative needs a model with an MTP module (num_nextn_predict_layers >= 1)")
    stream = TextStream(tokenizer)
    _, stats = generate(cfg, variables, [prompt], args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, speculative=args.speculative, stream_callback=stream,
                        eos_id=getattr(tokenizer, "eos_id", None))
    stream.close()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}), file=sys.stderr)
    return 0
