"""Inference: latent KV cache, prefill and absorbed-MLA decoding, generation, MTP self-speculative decoding."""
from .cache import C_KV_AXES, K_PE_AXES, KVCache, LayerCache, bytes_per_token_per_layer, cache_bytes, init_cache
from .decode import decode_params, decode_step, forward, mtp_forward, prefill, split_variables
from .generate import generate, validate_request
from .request import GenerationRequest
from .speculative import accept_drafts, accept_or_resample, speculative_generate

__all__ = ["C_KV_AXES", "K_PE_AXES", "KVCache", "LayerCache", "bytes_per_token_per_layer", "cache_bytes",
           "init_cache", "decode_params", "decode_step", "forward", "mtp_forward", "prefill", "split_variables", "generate",
           "validate_request", "GenerationRequest", "accept_drafts", "accept_or_resample", "speculative_generate"]
