"""Every backend implements the declared decoder interface (runtime/backends/protocol.py), so
nothing above the backends probes for attributes."""

import inspect

from cpm_deploy.runtime import CPMGenerator
from cpm_deploy.runtime.backends import Decoder, SlotDecoder
from cpm_deploy.runtime.backends.tensorrt_decoder import TensorRTDecoder


def test_onnxruntime_decoders_implement_the_protocol(trained_bundle):
    gen = CPMGenerator.from_bundle(trained_bundle, variant="cpu-fp32", threads=1)
    shared, cfg = gen.decoder, gen.config
    concat = CPMGenerator.from_bundle(trained_bundle, variant="decoder_last", threads=1).decoder
    assert isinstance(shared, SlotDecoder) and isinstance(concat, Decoder) and not isinstance(concat, SlotDecoder)
    for dec in (shared, concat):
        assert dec.max_batch is None and (dec.n_layer, dec.n_head * dec.head_dim) == (cfg["n_layer"], cfg["n_embd"])
        with dec.own_graph_steps() as same:
            assert same is dec


def test_the_tensorrt_decoder_declares_every_method():
    """Its construction needs a GPU: the class is checked, and its signatures against the protocol's."""
    for name in ("prefill", "step", "own_graph_steps", "settle"):
        ours = inspect.signature(getattr(TensorRTDecoder, name))
        declared = inspect.signature(getattr(Decoder, name))
        assert list(ours.parameters) == list(declared.parameters), name
