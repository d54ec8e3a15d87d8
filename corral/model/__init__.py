from corral.model.config import PRESETS, ModelConfig
from corral.model.llama import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer"]
