"""What plain and speculative decoding share (generate.py, speculative.py): the validated request, the
per-row collector of emitted tokens, the decode clock, and the start of a request (layout, cache, prefill).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..config import ModelConfig
from .cache import KVCache, init_cache
from .decode import Prefill, Sampling, jit_prefill, layout, pad_prompts

StreamCallback = Callable[[list], None]


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request (see `generate` for the meaning of each field)."""
    prompts: list                                  # token-id lists
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stream_callback: Optional[StreamCallback] = None
    eos_id: Optional[int] = None
    cache_dtype: Any = None
    max_len: Optional[int] = None
    shrink_batch: Optional[bool] = None


class Collector:
    """Per-prompt output lists with max_new_tokens / eos stopping and streaming, and which prompt each row of
    the decode batch serves (`rows`: the identity until a `BatchShrinker` drops rows whose prompt is done)."""

    def __init__(self, n_rows: int, max_new: int, eos_id: Optional[int], callback: Optional[StreamCallback]):
        self.out = [[] for _ in range(n_rows)]
        self.max_new, self.eos_id, self.callback = max_new, eos_id, callback
        self.done = np.zeros(n_rows, bool)
        self.rows = np.arange(n_rows)                  # batch row -> prompt; -1: a padding row, never live

    def add(self, new: list[list[int]]) -> None:
        emitted = []
        for i, toks in enumerate(new):
            got = []
            for t in toks:
                if self.done[i]:
                    break
                self.out[i].append(int(t))
                got.append(int(t))
                if len(self.out[i]) >= self.max_new or (self.eos_id is not None and t == self.eos_id):
                    self.done[i] = True
            emitted.append(got)
        if self.callback is not None and any(emitted):
            self.callback(emitted)

    def add_rows(self, per_row: list[list[int]]) -> None:
        """`add` with one token list per batch row (padding rows' lists are dropped)."""
        new = [[] for _ in self.out]
        for r, toks in zip(self.rows, per_row):
            if r >= 0:
                new[r] = toks
        self.add(new)

    @property
    def active(self) -> np.ndarray:
        return ~self.done

    @property
    def live_rows(self) -> np.ndarray:
        """[batch] bool: the batch rows whose prompt is still decoding."""
        return (self.rows >= 0) & ~self.done[np.maximum(self.rows, 0)]

    def most_left(self) -> int:
        """The most tokens any active row may still emit (>= 1 while a row is active)."""
        return max([self.max_new - len(o) for o, d in zip(self.out, self.done) if not d] or [1])

    def live_steps(self, outs, n: int):
        """Walk the first n per-step outputs of a device call (a pytree of [n_max, B, ...] host arrays):
        yields (that step's outputs, the batch rows still live at it), and stops once every row is done (later
        steps of the call ran for nothing and are dropped)."""
        for i in range(n):
            live = self.live_rows
            if not live.any():
                return
            yield jax.tree.map(lambda o: o[i], outs), live

    @property
    def count(self) -> int:
        return sum(len(o) for o in self.out)


class BatchShrinker:
    """Drops the rows whose prompt is done from the decode batch once at most half of it is still live: the
    live rows are gathered into a batch of the next power of two (padded with inactive copies of a live row),
    cache and decode state alike, and the device calls continue at that size. A request's rows finish at
    different steps when they stop at eos, or in speculative decoding accept different numbers of drafts, and
    until the slowest is done every step computed every row (experiments/results/bench_decode.md).

    policy: True shrinks whenever it can; False never; None (generate's default) only to a batch size whose
    step program this process has already run for the same cache size, so that shrinking never compiles a
    new program (which would cost more than it saves in a one-off request, and far more on an accelerator).
    Never on a cache spread over several devices (its batch axis is sharded)."""

    _ran: set = set()                 # (step program, batch, cache slots) this process has called

    def __init__(self, step, cache, policy: Optional[bool]):
        leaf = jax.tree.leaves(cache)[0]
        self.step, self.slots = step, leaf.shape[2]
        sharding = getattr(leaf, "sharding", None)
        self.policy = False if sharding is not None and len(sharding.device_set) > 1 else policy
        self.sizes = [leaf.shape[1]]

    def ran(self, batch: int) -> None:
        BatchShrinker._ran.add((self.step, batch, self.slots))

    @staticmethod
    def forget_compiled() -> None:
        """After JAX's compiled programs were dropped (code_maps.py): none of the step programs has run."""
        BatchShrinker._ran.clear()

    def __call__(self, col: Collector, cache, state):
        """(cache, state), shrunk (and col.rows with them) if the policy allows."""
        live = np.flatnonzero(col.live_rows)
        size = 1 << max(len(live) - 1, 0).bit_length()
        if (self.policy is False or not len(live) or size > len(col.rows) // 2
                or (self.policy is None and (self.step, size, self.slots) not in BatchShrinker._ran)):
            return cache, state
        pick = np.concatenate([live, np.repeat(live[:1], size - len(live))])
        col.rows = np.concatenate([col.rows[live], np.full(size - len(live), -1)])
        self.sizes.append(size)
        return _take_rows(cache, state, jnp.asarray(pick))


@jax.jit
def _take_rows(cache, state, rows):
    """The batch rows `rows` of a cache (batch on axis 1 of its arrays) and of a decode state (axis 0), in one
    compiled call: gathered leaf by leaf, eagerly, they were a dozen dispatches per shrink."""
    return jax.tree.map(lambda a: a[:, rows], cache), jax.tree.map(lambda a: a[rows], state)


class DraftCounts:
    """Speculative decoding's counts, per prompt: the steps its row took part in and the drafts it accepted.
    A batch steps until its slowest row is done, so one prompt whose drafts keep failing costs the whole batch
    (experiments/results/spec_drafts.md); `acceptance_per_prompt` shows which."""

    def __init__(self, n_prompts: int, drafts: int):
        self.drafts = drafts
        self.steps, self.accepted = np.zeros(n_prompts, np.int64), np.zeros(n_prompts, np.int64)

    def add(self, prompt_of_row: np.ndarray, live: np.ndarray, accepted: np.ndarray) -> None:
        """One step: prompt_of_row [B] (-1: a row serving none), live [B] bool, accepted [B] drafts."""
        rows = live & (prompt_of_row >= 0)
        np.add.at(self.steps, prompt_of_row[rows], 1)
        np.add.at(self.accepted, prompt_of_row[rows], accepted[rows])

    def stats(self) -> dict:
        stepped, accepted = int(self.steps.sum()), int(self.accepted.sum())
        per_prompt = np.where(self.steps > 0, self.accepted / np.maximum(self.steps * self.drafts, 1), 0.0)
        return dict(drafts=self.drafts * stepped, accepted=accepted, draft_tokens=self.drafts,
                    acceptance_rate=accepted / (self.drafts * stepped) if stepped else 0.0,
                    tokens_per_forward=1.0 + (accepted / stepped if stepped else 0.0),
                    acceptance_per_prompt=[float(a) for a in per_prompt])


class DecodeClock:
    """Decode timing with the first device call apart: it compiles the steps for a new shape (seconds on CPU),
    which would otherwise swamp tokens/s of short requests. tokens_per_s is over the calls after the first."""

    def __init__(self, col: Collector, t_start: float):
        self.col, self.t_start, self.t_first, self.n_start, self.n_first = col, t_start, None, col.count, 0

    def step_done(self) -> None:
        if self.t_first is None:
            self.t_first, self.n_first = time.perf_counter(), self.col.count

    def stats(self) -> dict:
        t_end, n_end = time.perf_counter(), self.col.count
        t_first = self.t_first or t_end
        steady_s, steady_n = t_end - t_first, n_end - self.n_first
        if steady_n <= 0 or steady_s <= 0:          # a single step: fall back to the whole decode
            steady_s, steady_n = t_end - self.t_start, n_end - self.n_start
        return {"new_tokens": n_end, "decode_s": t_end - self.t_start, "first_step_s": t_first - self.t_start,
                "tokens_per_s": steady_n / steady_s if steady_s > 0 and steady_n > 0 else 0.0}


class Started(NamedTuple):
    """A request after its prefill."""
    tokens: np.ndarray          # [B, T] right-padded prompts
    lengths: np.ndarray         # [B]
    tok: jax.Array              # first new token of each row (from the prefill)
    cache: KVCache
    prefill: Prefill            # the prefill output (h_tail for speculative decoding)
    col: Collector
    sampling: Sampling
    t0: float                   # prefill start and end (perf_counter)
    t1: float


def replicated_on_mesh_of(tree, ref: jax.Array):
    """tree (host or default-placed arrays) replicated on the mesh `ref` lives on (unchanged placement when ref
    is on no mesh, or is a host array). The decode loops feed each device call's outputs to the next, and those carry the mesh of
    the weights; a first call fed arrays placed without it has other input types than the calls after it, so
    jit would compile the step (or refill) program twice."""
    sharding = getattr(ref, "sharding", None)                       # None: ref is a host (numpy) array
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    return jax.device_put(tree, sharding)


def start_request(cfg: ModelConfig, params: dict, router_state: dict, req: GenerationRequest, *,
                  mtp: bool, drafts: int = 1) -> Started:
    """The part plain and speculative decoding share: lay out and pad the prompts (the cache sized for
    `drafts` per speculative step), allocate the latent cache (with MTP caches when mtp), run the jitted
    prefill (which samples each row's first new token) and hand that token to the collector."""
    t_pad, slots = layout(req.prompts, req.max_new_tokens, req.max_len, drafts)
    tokens, lengths = pad_prompts(req.prompts, t_pad)
    cache = init_cache(cfg, len(req.prompts), slots, req.cache_dtype, mtp=mtp)
    sampling = Sampling(jax.random.PRNGKey(req.seed), jnp.float32(req.temperature), jnp.float32(req.top_p))
    col = Collector(len(req.prompts), req.max_new_tokens, req.eos_id, req.stream_callback)
    t0 = time.perf_counter()
    tok, out = jit_prefill(cfg, mtp)(params, router_state, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                                     jax.random.fold_in(sampling.key, 0), sampling.temperature, sampling.top_p)
    tok_host = np.asarray(tok)
    t1 = time.perf_counter()
    col.add([[t] for t in tok_host])
    return Started(tokens, lengths, tok, out.cache, out, col, sampling, t0, t1)
