"""Pure NumPy math behind the passes: no onnx_ir, no graph plumbing, easy to test on arrays."""
