"""Shipping a model: ONNX export checked against onnxruntime (``onnx_export``), timm-loadable backbones
(``timm_export``) and latency / throughput / FLOPs of the runtimes on this machine (``bench``)."""
