"""The models, from one import: ``from jax_vaecf import model``.

The public face of :mod:`jax_vaecf.models`: the registry (``model.names()``,
``model.register(name, ModelEntry(...))``, ``model.build_model(name, n_items)``), the
interface every model implements (:class:`CFModel`), the layers and settings types
models are made of, and the paper's two models, :class:`MultVAE` and :class:`MultDAE`.
RecVAE, EASE and EDLAE are built by name (``build_model("recvae", n_items)``).
"""

from jax_vaecf.models.base import (Array, Input, kernel_init, bias_init, ModelOutput,
                                   Phase, ONE_PHASE, add_bias, Dense, InputDense,
                                   check_input, CFModel, sample_posterior, model_setting,
                                   setting_fields, check_choices, ModelEntry,
                                   ClosedFormProblem, ClosedFormFit, MODELS, names,
                                   register, unregister, model_entry, make_settings,
                                   settings_json, shape_settings, build_model,
                                   model_from_identity, count_params)
from jax_vaecf.models.multvae import (MultVAE, MultDAE, MultVAESettings, MultDAESettings,
                                      MULTVAE, MULTDAE)

__all__ = (
    "Array", "Input", "kernel_init", "bias_init", "ModelOutput", "Phase", "ONE_PHASE",
    "add_bias", "Dense", "InputDense", "check_input", "CFModel", "sample_posterior",
    "model_setting", "setting_fields", "check_choices", "ModelEntry",
    "ClosedFormProblem", "ClosedFormFit", "MODELS", "names", "register", "unregister",
    "model_entry", "make_settings", "settings_json", "shape_settings", "build_model",
    "model_from_identity", "count_params", "MultVAE", "MultDAE", "MultVAESettings",
    "MultDAESettings", "MULTVAE", "MULTDAE",
)
