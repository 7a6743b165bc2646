"""Models of the Mixer family and their registry (``create_model``, ``list_models``)."""

from widesparse.models.registry import create_model, list_models, model_defaults, model_entrypoint, register_model

__all__ = ["create_model", "list_models", "model_defaults", "model_entrypoint", "register_model"]
