"""Decoder backends behind one declared interface (``protocol.py``): onnxruntime graphs with a
concatenated or a shared KV cache, and TensorRT engines."""

from .protocol import Decoder, SlotDecoder


def open_decoder(path, config: dict, kv_cache: str, provider: str = "cpu", threads: int | None = None,
                 prefill_path=None) -> Decoder:
    """The onnxruntime decoder for a manifest graph of kind ``kv_cache`` ("concat" or "shared")."""
    from .ort_decoder import ConcatKVDecoder, SharedKVDecoder

    cls = {"concat": ConcatKVDecoder, "shared": SharedKVDecoder}.get(kv_cache)
    if cls is None:
        raise ValueError(f"unknown kv_cache kind {kv_cache!r} in the manifest")
    return cls(path, config, provider, threads, prefill_path=prefill_path)


__all__ = ["Decoder", "SlotDecoder", "open_decoder"]
