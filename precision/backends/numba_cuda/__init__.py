"""``--backend numba --device gpu``: the numba backend's training loops as CUDA kernels (numba-cuda), with the CPU
backend's per-op rounding contract, so that a run gives the same bits as ``--device cpu`` (docs/numba_cuda.md).

The numba backend routes a GPU spec here (``NumbaBackend.availability`` / ``train``); this package is imported only
then, so a CPU-only install without numba-cuda never imports it. Modules: :mod:`.device` (scalar device functions:
never-contracted arithmetic, the rounding, the transcendentals), :mod:`.kernels` (the step's kernels),
:mod:`.train` (the host driver, reusing the CPU backend's preparation).

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported) the same kernels run as Python:
that checks their logic and op order, not NVVM's code generation (docs/numba_cuda.md).
"""

from __future__ import annotations

import importlib.util

__all__ = ["gpu_availability", "simulator_enabled"]

INSTALL_HINT = "pip install 'precision[cuda]'"


def simulator_enabled() -> bool:
    """Whether numba.cuda is (or will be, when first imported) the CUDA simulator."""
    import numba
    return bool(numba.config.ENABLE_CUDASIM)


def gpu_availability() -> tuple[bool, str]:
    """(available, reason): one line naming what is missing, never an exception."""
    if importlib.util.find_spec("numba_cuda") is None:
        return False, (f"the numba backend runs on the CPU only here: its GPU kernels need the numba-cuda package, "
                       f"which is not installed ({INSTALL_HINT})")
    try:
        from numba import cuda
        if cuda.is_available():
            return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)" if simulator_enabled() else ""
    except Exception as exc:  # a broken driver or toolkit: say so in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return False, f"the numba backend runs on the CPU only here: numba-cuda failed ({type(exc).__name__}: {first})"
    return False, ("the numba backend runs on the CPU only here: numba-cuda finds no CUDA GPU (no NVIDIA GPU or "
                   "driver; NUMBA_ENABLE_CUDASIM=1 runs its kernels in numba's CUDA simulator)")
