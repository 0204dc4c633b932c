"""Flax Llama-family models and their loaders (HF safetensors, GGUF, orbax, dummy weights)."""

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.loaded import LoadedModel
from jaxpaged.models.loader import SHIPPED_CONFIGS, embedded_model_path, load_model
from jaxpaged.models.metadata import AttentionMetadata
from jaxpaged.models.orbax_loader import save_orbax

__all__ = ["AttentionMetadata", "LoadedModel", "ModelConfig", "SHIPPED_CONFIGS", "embedded_model_path", "load_model",
           "save_orbax"]
