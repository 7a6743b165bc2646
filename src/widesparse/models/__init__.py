"""Models of the Mixer family and their registry (``create_model``, ``list_models``).

Importing this package imports every model file, whose ``register_model``/``register_preset`` calls fill the
registry (:mod:`widesparse.models.registry` itself imports no model). So ``from widesparse.models.registry import
create_model`` also finds every model: importing a submodule runs this ``__init__`` first.
"""

from widesparse.models import mixer, monarch_mlp, sw_mlp  # noqa: F401  (the model files, for their registrations)
from widesparse.models.registry import (
    create_model,
    list_models,
    model_defaults,
    model_entrypoint,
    register_model,
    register_preset,
)

__all__ = ["create_model", "list_models", "model_defaults", "model_entrypoint", "register_model", "register_preset"]
