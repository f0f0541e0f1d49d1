"""Triton kernels of peer-kernels, one file per stage of the PEER layer.

Installed as `peer_kernels.csrc_triton` (setup.py maps this folder there); in a plain
checkout `peer_kernels/__init__.py` loads it under the same name.

- product_key_topk.py: stage 1, product-key retrieval (forward and backward).
- peer_experts_fwd.py: stage 2, the gathered single-neuron experts, forward.
- peer_experts_bwd.py: stage 2, backward (dx, dgates, d_down, d_up).
- segments.py: CSR offsets of sorted row ids (the deterministic backward of both stages).
- key_segments.py: stage 1's backward, its selections grouped by sub-key row without a sort.
- index_check.py: stage 2's id check on the GPU (a device assert, no host sync).
"""
