"""Linen modules of the DeepSeek-V3 model."""
from .transformer import DecoderBlock, ModelOutput, MTPModule, Transformer

__all__ = ["DecoderBlock", "ModelOutput", "MTPModule", "Transformer"]
