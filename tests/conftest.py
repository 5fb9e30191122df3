"""Shared fixtures: the reference files in ../shared (CI has them beside the checkout) and small models."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU, Triton (where installed) runs φ's kernels on CPU tensors through its interpreter, which has to be on
# before triton is first imported (torch.compile imports it): test_triton_kernels.py runs that way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("METAPERTURB_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"
OFFICIAL_CHECKPOINT = REFERENCE / "official_tin_resnet20_perturb_750.pth"
OFFICIAL_GOLDEN = REFERENCE / "official_golden.safetensors"


@pytest.fixture(scope="session")
def official_checkpoint() -> Path:
    if not OFFICIAL_CHECKPOINT.is_file():
        pytest.skip(f"the authors' checkpoint is not at {OFFICIAL_CHECKPOINT} (set METAPERTURB_SHARED to ../shared)")
    return OFFICIAL_CHECKPOINT


@pytest.fixture(scope="session")
def official_golden() -> Path:
    if not OFFICIAL_GOLDEN.is_file():
        pytest.skip(f"the golden outputs are not at {OFFICIAL_GOLDEN} (set METAPERTURB_SHARED to ../shared)")
    return OFFICIAL_GOLDEN


@pytest.fixture
def perturbation():
    from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel

    torch.manual_seed(0)
    return MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: a second, spin-waiting thread only adds contention on a
    shared 2-core machine, and subprocess drivers compare runs bit for bit at the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fused_kernel():
    """The kernel dispatch, with φ's fused CPU kernel built once per session (or the cached build taken); skips where
    it cannot be built."""
    from metaperturb_hf.kernels import dispatch

    problem = dispatch.availability()
    if problem is not None:
        pytest.skip(f"φ's fused CPU kernel is not usable here: it {problem}")
    return dispatch


@pytest.fixture(scope="session")
def triton_kernel():
    """The kernel dispatch, with φ's Triton kernel loaded and self-checked: on CUDA, or without a GPU on CPU tensors
    through Triton's interpreter; skips where triton is not installed."""
    pytest.importorskip("triton")
    from metaperturb_hf.kernels import dispatch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off (TRITON_INTERPRET)")
    problem = dispatch.availability("triton")
    assert problem is None, f"φ's Triton kernel {problem}"
    return dispatch


@pytest.fixture(params=["eager", "cpu", "triton"])
def kernel(request):
    """Each φ path by name, for tests that hold for all (on CPU tensors); "cpu" skips where the kernel cannot be
    built, "triton" where triton is missing or a GPU is present (CPU tensors then go eager: test_triton_kernels.py
    covers the GPU)."""
    if request.param == "cpu":
        request.getfixturevalue("fused_kernel")
    if request.param == "triton":
        if torch.cuda.is_available():
            pytest.skip("Triton takes CPU tensors only through its interpreter, which is off where a GPU is")
        request.getfixturevalue("triton_kernel")
    return request.param
