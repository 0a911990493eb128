"""Torch-free runtime: tokenizer, sampling, onnxruntime sessions, generation.

    from cpm_deploy.runtime import CPMGenerator
    gen = CPMGenerator.from_bundle("cpm-bundle")
    gen("清华大学", max_length=50, do_sample=True, top_p=0.9)
"""

from .bundle.reader import Bundle, BundleError
from .generation.generator import CPMGenerator, GenerationError
from .generation.sampling import SamplingConfig
from .backends.session import ProviderError
from .text.tokenizer import CPMTokenizer, StreamDecoder

__all__ = ["Bundle", "BundleError", "CPMGenerator", "CPMTokenizer", "GenerationError", "ProviderError",
           "SamplingConfig", "StreamDecoder"]
