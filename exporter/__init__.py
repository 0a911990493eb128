"""Torch side of cpm-deploy: reference model, checkpoint loaders, ONNX export, parity checks."""

from .config import PRESETS, CPMConfig, ConfigError
from .export import ExportOptions, ParityError, export_bundle
from .load import Checkpoint, load_checkpoint
from .model import CPMModel
from .state_dict import CheckpointError

__all__ = ["PRESETS", "CPMConfig", "ConfigError", "CPMModel", "Checkpoint", "CheckpointError",
           "ExportOptions", "ParityError", "export_bundle", "load_checkpoint"]
