"""The GPU fusion tests' kernels under Triton's CPU interpreter (CI has no GPU).

TRITON_INTERPRET is read when a kernel is decorated, i.e. when its module is imported: a module that an
earlier test imported without the interpreter is reloaded here (the module object stays the same, so
names bound to it before keep working).
"""

from __future__ import annotations

import importlib
import os


def kernels_device() -> str:
    """Reload the fused kernels' modules for the interpreter where needed; the device the tests use."""
    from qatserve.quant.kernels import triton_dense, triton_fused, triton_gemv, triton_kv_store
    from qatserve.quant.kernels import triton_moe, triton_qmatmul

    if os.environ.get("TRITON_INTERPRET") == "1":
        for module, kernel in ((triton_gemv, "_gemv_kernel"), (triton_dense, "_dense_gemv_kernel"),
                               (triton_kv_store, "_kv_store_kernel"), (triton_fused, "_rms_norm_kernel"),
                               (triton_moe, "_gather_gemv_kernel")):
            if type(getattr(module, kernel)).__name__ != "InterpretedFunction":
                importlib.reload(module)
    return "cpu" if triton_qmatmul.interpreting() else "cuda"
