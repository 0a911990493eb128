"""cpm-deploy: CPM-Generate from checkpoint to a verified ONNX / TensorRT deployment.

Subpackages: ``exporter`` (torch side), ``optimize`` (graph passes), ``runtime``
(torch-free generation), ``cli`` (click commands).
"""

__version__ = "0.2.0"
