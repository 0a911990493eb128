"""Device facts and buffers through cuda-python, imported only when a GPU path runs."""

from __future__ import annotations

from ..errors import CPMError


class CudaUnavailable(CPMError, RuntimeError):
    pass


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # older cuda-python
        return runtime
    except ImportError:
        raise CudaUnavailable("cuda-python is not installed: pip install 'cpm-deploy[tensorrt]'") from None


def check(result):
    """cuda-python returns (err, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaUnavailable(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values


def device() -> dict:
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": (props.major, props.minor)}


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise CudaUnavailable("TensorRT is not installed: pip install 'cpm-deploy[tensorrt]' "
                              "(tensorrt-cu12 10.4, the last release that builds for V100)") from None
    return tensorrt
