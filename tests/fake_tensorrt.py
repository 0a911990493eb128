"""A recording stand-in for the ``tensorrt`` module: enough of the 10.4 Python API for
optimize/tensorrt/build.py to run its real code path without a GPU. It checks calls and their
arguments; it knows nothing of TensorRT's behaviour."""

from __future__ import annotations

import types

import onnx


def make(version: str = "10.4.0") -> types.SimpleNamespace:
    rec = {"flags": set(), "pools": {}, "profiles": [], "layers": {}, "io_dtypes": {}, "phases": [],
           "network_flags": None, "timing_cache_in": None}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class LayerType:
        NORMALIZATION, SOFTMAX, OTHER = "NORMALIZATION", "SOFTMAX", "OTHER"

    class Layer:
        def __init__(self, node):
            self.name = node.name
            self.type = {"LayerNormalization": LayerType.NORMALIZATION, "Softmax": LayerType.SOFTMAX}.get(node.op_type, LayerType.OTHER)
            self.num_outputs = len(node.output)
            self._precision, self.output_types = None, {}

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, value):
            self._precision = value
            rec["layers"][self.name] = value

        def set_output_type(self, i, dtype):
            self.output_types[i] = dtype

    class Tensor:
        def __init__(self, name):
            self.name, self._dtype = name, "float32"

        @property
        def dtype(self):
            return self._dtype

        @dtype.setter
        def dtype(self, value):
            self._dtype = value
            rec["io_dtypes"][self.name] = value

    class Network:
        def __init__(self):
            self.layers, self.inputs, self.outputs = [], [], []

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            self.network.layers = [Layer(n) for n in model.graph.node]
            self.network.inputs = [Tensor(i.name) for i in model.graph.input]
            self.network.outputs = [Tensor(o.name) for o in model.graph.output]
            return True

        def get_error(self, i):
            return ""

    class Profile:
        def __init__(self):
            self.shapes = {}
            rec["profiles"].append(self.shapes)

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            rec["pools"][pool] = size

        def set_flag(self, flag):
            rec["flags"].add(flag)

        def add_optimization_profile(self, profile):
            return len(rec["profiles"]) - 1

        def create_timing_cache(self, data):
            rec["timing_cache_in"] = data
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = config.progress_monitor
            if monitor is not None:  # what TensorRT does while it builds
                monitor.phase_start("Building engine", None, 3)
                for step in range(3):
                    assert monitor.step_complete("Building engine", step)
                monitor.phase_finish("Building engine")
            return b"serialized-engine"

    class IProgressMonitor:
        def __init__(self):
            pass

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16, OBEY_PRECISION_CONSTRAINTS = "FP16", "OBEY_PRECISION_CONSTRAINTS"

    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0

    return types.SimpleNamespace(
        __version__=version, Logger=Logger, LayerType=LayerType, Builder=Builder, OnnxParser=OnnxParser,
        IProgressMonitor=IProgressMonitor, MemoryPoolType=MemoryPoolType, BuilderFlag=BuilderFlag,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, float32="float32", float16="float16",
        record=rec,
    )
