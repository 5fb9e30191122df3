"""Loading φ's fused kernels: the CPU extension built on first use (cached on disk), Triton imported on demand.

A kernel that cannot be loaded (no compiler, no ninja, a failed build, no triton) is remembered with the line that
says why, so that the dispatch falls back to eager and logs that reason once.
"""

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("phi_cpu.cpp")
# -fno-trapping-math: no code here reads floating-point exception flags, and without it GCC will not turn the clamp
# before the expected-noise table's index into a select, which leaves that loop unvectorised.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
NAMES = {"cpu": ("CPU kernel", "built"), "triton": ("Triton kernel", "loaded")}  # for messages: what, and its failure
_lock = threading.Lock()
# per kernel: "module" or "error"; "checked": True or the self-check's failure; "logged" once eager was announced
states: dict = {kernel: {} for kernel in NAMES}


def _build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "metaperturb_hf"
    return Path(root) / name


def extension(kernel: str = "cpu"):
    """The kernel's module (`forward`, `backward`, `normals`), loaded on the first call; None where it cannot be."""
    state = states[kernel]
    with _lock:
        if "module" in state or "error" in state:
            return state.get("module")
        try:
            state["module"] = _build_cpu() if kernel == "cpu" else _import_triton()
        except Exception as error:  # no compiler, no ninja, a failed build, no triton: all mean "use eager"
            state["error"] = _summary(error)
        return state.get("module")


def _build_cpu():
    """The compiled CPU module, cached on disk (keyed by source, flags, torch and CPU)."""
    from torch.utils.cpp_extension import load

    # -march=native: the key carries the CPU's model so that a shared cache never serves another CPU's build.
    key = hashlib.sha256(b"".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), torch.__version__.encode(),
                                  _cpu_model().encode()])).hexdigest()[:16]
    name = f"metaperturb_phi_cpu_{key}"
    directory = _build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


def _import_triton():
    from . import phi_triton

    return phi_triton


def triton_devices() -> tuple[str, ...]:
    """Triton runs on CUDA tensors, and on CPU tensors only through its interpreter."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _summary(error: Exception) -> str:
    """The line of a build failure that says what failed (the compiler's first error, else the last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
    return f"{type(error).__name__}: {reason}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()

