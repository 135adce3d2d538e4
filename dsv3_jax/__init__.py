"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE with auxiliary-loss-free balancing, MTP) in JAX/Flax."""
from .config import ModelConfig, RopeScaling, PRESETS, get_preset
from .model import ModelOutput, Transformer

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "get_preset", "ModelOutput", "Transformer"]
