"""mnv2-tvm: the MobileNetV2 paper's models from PyTorch through Apache TVM onto edge boards."""

__version__ = "0.1.0"
