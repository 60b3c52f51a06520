"""Frontends turn a user's model (an ``.onnx`` file, a PyTorch module or program) into onnx_ir.

Each frontend returns an ``onnx_ir.Model`` and raises ``UnsupportedModelError`` with a one-line
message naming the input when the model cannot be used, so that nothing downstream has to
re-validate files or exporter output.
"""
