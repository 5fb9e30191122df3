"""φ's Triton kernels against the eager path: the CPU kernel's checks (test_kernels.py) on the Triton kernel.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets
before triton is imported), which does not compile them: the last test compiles each for an sm_90 GPU. With a GPU
they run on CUDA tensors, and CUDA-graph capture and inductor's max-autotune are tried as well.
"""

import collections
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import (  # noqa: E402
    CASES,
    EXPECTED_CASES,
    check_backward_sees_the_forward_noise,
    check_case,
    check_checkpointing_and_monitor,
    check_compile,
    check_expected_noise_at_extremes,
    check_flat_features,
    check_manual_seed,
    check_only_the_wanted_gradients,
    check_standard_normal_draws,
    make_phi,
)

from metaperturb_hf.kernels import dispatch, loading  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the interpreter runs each program in numpy: the 32×32 cases cost minutes there
MATRIX = [case for case in CASES if CUDA or "32x32" not in case]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def triton_calls(triton_kernel):
    """Counts the Triton kernel's forward and backward calls, so that a test can tell it ran and not eager."""
    with pytest.MonkeyPatch.context() as patch:
        # eager's float32 convolutions must not round to TF32 on the GPU, or no comparison holds to 1e-5
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)
        module = loading.extension("triton")
        assert module.INTERPRETED != CUDA, "phi_triton was imported before TRITON_INTERPRET was set (or unset)"
        calls = collections.Counter()
        for name in ("forward", "backward"):
            patch.setattr(module, name,
                          lambda *args, _name=name, _run=getattr(module, name):  # noqa: B008 (bound per name)
                          calls.update([_name]) or _run(*args))
        yield calls


@pytest.fixture
def ran_triton(triton_calls):
    """Asserts after the test that the Triton kernel computed every forward and backward of it."""
    triton_calls.clear()
    yield
    assert triton_calls["forward"] > 0 and triton_calls["backward"] > 0, "φ ran eager, not on the Triton kernel"


@pytest.mark.parametrize("case", MATRIX)
def test_triton_kernel_matches_eager_with_explicit_noise(case, ran_triton):
    check_case(case, "triton", DEVICE)


# the interpreter evaluates the 8 nodes in numpy: three cases (the self-check covers training and gradients too)
@pytest.mark.parametrize("case", EXPECTED_CASES if CUDA else ["eval", "kappa_0.3_eval_clip", "rows_across_tiles"])
def test_triton_kernel_matches_eager_in_the_expected_noise_mode(case, ran_triton):
    check_case(case, "triton", DEVICE, expected=True)


def test_expected_noise_at_extreme_arguments(ran_triton):
    check_expected_noise_at_extremes("triton", DEVICE)


def test_flat_features_match_eager(ran_triton):
    check_flat_features("triton", DEVICE)


def test_only_the_wanted_gradients(ran_triton):
    check_only_the_wanted_gradients("triton", DEVICE)


def test_drawn_noise_is_standard_normal_and_fixed_by_the_seed():
    check_standard_normal_draws("triton", DEVICE)


def test_backward_sees_the_noise_of_the_forward(ran_triton):
    check_backward_sees_the_forward_noise("triton", DEVICE, tolerance=1e-10)


def test_manual_seed_reproduces_a_run_seeds_differ_and_the_layout_does_not_matter(ran_triton):
    check_manual_seed("triton", DEVICE)


def test_checkpointing_and_monitor_agree_with_the_plain_call(ran_triton):
    check_checkpointing_and_monitor("triton", DEVICE)


def test_torch_compile_traces_through_phi_and_matches_eager(ran_triton):
    check_compile("triton", DEVICE, backend="aot_eager")


def test_auto_takes_the_kernel_of_the_features_device(triton_calls, monkeypatch):
    """auto: Triton for CUDA features; for CPU features the CPU kernel (here one that failed to build: eager), even
    under the interpreter."""
    monkeypatch.setitem(loading.states, "cpu", {"error": "RuntimeError: not built in this test", "logged": True})
    phi = make_phi().to(DEVICE)
    for device in {"cpu", DEVICE}:
        triton_calls.clear()
        stats = (torch.zeros(3, 4, device=device), torch.ones(3, 4, device=device))
        phi.to(device)(torch.randn(2, 3, 4, 4, device=device), *stats, 8, 8, kernel="auto")
        assert triton_calls["forward"] == (device == "cuda")


@pytest.mark.skipif(not CUDA, reason="inductor's max-autotune compiles for a GPU")
def test_max_autotune_compiles_through_phi(ran_triton):
    check_compile("triton", DEVICE, mode="max-autotune-no-cudagraphs")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_captures_phi_and_replays_draw_new_noise():
    """φ's forward and backward captured in one CUDA graph: no host synchronisation inside (capture would fail), a
    replay with explicit noise matches an uncaptured call, and drawn noise is new at each replay."""
    phi = make_phi().cuda()
    phi.kernel = "triton"
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    noise, upstream = torch.randn_like(x), torch.randn_like(x)
    stats = (torch.zeros(8, 4, device="cuda"), torch.ones(8, 4, device="cuda"))

    def step(explicit):
        x.grad = None
        phi(x, *stats, 8, 8, noise=noise if explicit else None, clip_value=2.0).backward(upstream)
        return x.grad

    expected = step(explicit=True).clone()
    graphs = []
    for explicit in (True, False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            step(explicit)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            grad = step(explicit)
        graphs.append((graph, grad))
    (explicit_graph, explicit_grad), (drawn_graph, drawn_grad) = graphs
    explicit_graph.replay()
    torch.testing.assert_close(explicit_grad, expected, rtol=1e-5, atol=1e-5)
    drawn_graph.replay()
    first = drawn_grad.clone()
    drawn_graph.replay()
    assert torch.isfinite(first).all() and not torch.equal(first, drawn_grad)


def test_a_capture_before_the_self_check_says_to_warm_up(monkeypatch):
    """The one-time self-check synchronises, so it cannot be the first call inside a CUDA-graph capture."""
    monkeypatch.setitem(loading.states, "triton", {"module": loading.extension("triton")})  # not checked yet
    monkeypatch.setattr(dispatch, "unsupported", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    features_on_cuda = types.SimpleNamespace(device=torch.device("cuda"))  # select reads only the device here
    with pytest.raises(RuntimeError, match="warm-up"):
        dispatch.select("auto", features_on_cuda, (), None, None, None, None)


_COMPILE_FOR_SM90 = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from metaperturb_hf.kernels import phi_triton

POINTERS = {"active_ptr": "*u8", "seed_ptr": "*i64"}  # the rest hold the features' dtype


def signature(kernel, dtype):
    return {p.name: "constexpr" if p.is_constexpr else p.annotation or (
        POINTERS.get(p.name, "*" + dtype) if p.name.endswith("_ptr") else "i32") for p in kernel.params}


tile, stat = {"BLOCK_P": 64, "BLOCK_C": 16}, {"BLOCK_B": 64, "BLOCK_C": 16}
every_branch = {"STATS": True, "ACTIVE": True, "TRAINING": True, "DRAWN": True, "EXPECTED": False, "NODES": 8,
                "CLIP": True, "NEEDS_INPUT": True, "PARTIALS": True, "BLOCK": 1024}
compiled = []
for name in sorted(vars(phi_triton)):
    kernel = getattr(phi_triton, name)
    if name.endswith("_kernel"):
        names = {p.name for p in kernel.params if p.is_constexpr}
        # the expected-noise mode replaces the drawn noise: a second binary where a kernel has that branch
        for mode in ({}, {"DRAWN": False, "EXPECTED": True}) if "EXPECTED" in names else ({},):
            constexprs = {k: v for k, v in {**every_branch, **mode, **(stat if "BLOCK_B" in names else tile)}.items()
                          if k in names}
            source = ASTSource(fn=kernel, signature=signature(kernel, "fp32"), constexprs=constexprs)
            triton.compile(source, target=GPUTarget("cuda", 90, 32))
            compiled.append(name + (" (expected noise)" if mode else ""))
print(json.dumps(compiled))
'''


@pytest.mark.skipif(CUDA, reason="with a GPU the kernels are compiled and run by the other tests")
def test_every_kernel_compiles_for_an_sm90_gpu():
    """The interpreter runs the kernels' Python; this compiles each (float32, every branch on) to an H100/H200 binary,
    which catches what only the compiler checks (types, loop-carried values, constexpr use)."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.splitlines()[-1])) == 10  # 8 kernels, 2 of them also in the expected mode
