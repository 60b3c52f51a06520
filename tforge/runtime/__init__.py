"""The runtime layer: what runs or stores a model outside the IR.

``ort`` (ONNX Runtime as the reference interpreter: sessions, feeds, models larger than memory in
pieces), ``generate`` (greedy generation and timing with any KV-cache graph), ``spill``
(rewritten weights in a memory-mapped scratch file), ``save`` (atomic writes).
Every other layer may import it; it imports only ``tforge.errors``.
"""
