"""The editors for speed: the same function as components/editors (loreft.py, hooks.py), with the
parameters of same-shape editors in banks (bank.py, editor.py), a batched sync-free
orthonormalisation and hand-written backwards (ops.py), fused Triton kernels on CUDA (kernels.py,
orthonormal_kernel.py), CUDA graphs of the vision layers (graphs.py), and the hooks that use them
(sites.py). docs/performance.md gives the measurements that justify each."""
