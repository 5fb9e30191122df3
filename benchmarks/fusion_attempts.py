"""Ways to fuse φ's kernels that were tried on the CPU and not kept, each timed against the eager path it would
replace.

The eager φ is memory-bound (benchmarks/overhead.py: `frozen_train_step_eager_floor`, `full_size_kernels_per_site`),
so the obvious remedy is fewer, fused passes. Three candidates, on one site of 128×C×32×32 in channels-last:

  compile      torch.compile (inductor) of φ's frozen forward + backward, stencils written as nine shifted adds so
               that inductor can fuse them with the elementwise tail;
  multiplier   the four statistics stencils as one depthwise convolution with channel multiplier 4;
  cpp          an OpenMP C++ kernel (torch.utils.cpp_extension.load_inline, -O3 -march=native) computing the hidden
               layer and the four pooled statistics in one pass over h (needs a compiler and ninja).

It prints one JSON line per candidate: median milliseconds of the candidate and of the eager code, and their ratio.

    python benchmarks/fusion_attempts.py [--channels 16] [--only compile,multiplier,cpp]
"""

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.modeling_metaperturb import _stencil

BATCH, SIZE = 128, 32

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <vector>

// hidden = ReLU(λ ⋆ h + γ ⋆ mean_c h) and pooled[b, c, k] = mean_HW ReLU(K_k ⋆ h), h channels-last
// (B, H, W, C).
std::vector<at::Tensor> hidden_and_statistics(at::Tensor x, at::Tensor channel_mean, at::Tensor lam, at::Tensor gam,
                                              at::Tensor stat) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto hidden = at::empty_like(x);
  auto pooled = at::zeros({B, C, 4}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float *X = x.data_ptr<float>(), *M = channel_mean.data_ptr<float>();
  float *Hd = hidden.data_ptr<float>(), *P = pooled.data_ptr<float>();
  float l[9], g[9], k[4][9];
  for (int t = 0; t < 9; t++) {
    l[t] = lam.data_ptr<float>()[t];
    g[t] = gam.data_ptr<float>()[t];
    for (int q = 0; q < 4; q++) k[q][t] = stat.data_ptr<float>()[q * 9 + t];
  }
  #pragma omp parallel
  {
    std::vector<float> buffer(C * 5), sums(C * 4);
    float *a = buffer.data(), *r0 = a + C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t i = 0; i < H; i++)
        for (int64_t j = 0; j < W; j++) {
          float mean_term = 0;
          for (int di = -1; di <= 1; di++)
            for (int dj = -1; dj <= 1; dj++) {
              int64_t ii = i + di, jj = j + dj;
              if (ii >= 0 && ii < H && jj >= 0 && jj < W)
                mean_term += g[(di + 1) * 3 + dj + 1] * M[(b * H + ii) * W + jj];
            }
          for (int64_t c = 0; c < C; c++) { a[c] = mean_term; r0[c] = r1[c] = r2[c] = r3[c] = 0; }
          for (int di = -1; di <= 1; di++)
            for (int dj = -1; dj <= 1; dj++) {
              int64_t ii = i + di, jj = j + dj;
              if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
              const int t = (di + 1) * 3 + dj + 1;
              const float *xp = X + ((b * H + ii) * W + jj) * C;
              const float lw = l[t], k0 = k[0][t], k1 = k[1][t], k2 = k[2][t], k3 = k[3][t];
              #pragma omp simd
              for (int64_t c = 0; c < C; c++) {
                const float v = xp[c];
                a[c] += lw * v; r0[c] += k0 * v; r1[c] += k1 * v; r2[c] += k2 * v; r3[c] += k3 * v;
              }
            }
          float *out = Hd + ((b * H + i) * W + j) * C;
          for (int64_t c = 0; c < C; c++) {
            out[c] = std::max(a[c], 0.f);
            sums[c * 4] += std::max(r0[c], 0.f); sums[c * 4 + 1] += std::max(r1[c], 0.f);
            sums[c * 4 + 2] += std::max(r2[c], 0.f); sums[c * 4 + 3] += std::max(r3[c], 0.f);
          }
        }
      for (int64_t q = 0; q < C * 4; q++) P[b * C * 4 + q] = sums[q] / (H * W);
    }
  }
  return {hidden, pooled};
}
"""


def interleaved_ms(candidate, eager, repeats: int = 11) -> tuple[float, float]:
    for _ in range(2):
        candidate(), eager()
    times = ([], [])
    for _ in range(repeats):
        for function, record in zip((candidate, eager), times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def shifted_stencil(padded: torch.Tensor, kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A 3×3 per-channel stencil as nine shifted multiply-adds: elementwise work inductor can fuse."""
    terms = [padded[:, :, i:i + height, j:j + width] * kernel[i, j] for i in range(3) for j in range(3)]
    return sum(terms[1:], terms[0])


def _pad_one(features: torch.Tensor) -> torch.Tensor:
    return F.pad(features, (1, 1, 1, 1))


def phi_as_shifts(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, descriptors):
    """φ's frozen training-mode forward (κ = 1, no clamp), written for torch.compile."""
    _, channels, height, width = h.shape
    padded = _pad_one(h)
    hidden = torch.relu(shifted_stencil(padded, identity_kernels[0, 0], height, width)
                        + shifted_stencil(_pad_one(h.mean(1, keepdim=True)), mean_kernels[0, 0], height, width))
    mu = (shifted_stencil(_pad_one(hidden), identity_kernels[1, 0], height, width)
          + shifted_stencil(_pad_one(hidden.mean(1, keepdim=True)), mean_kernels[1, 0], height, width))
    z = F.softplus(mu + torch.randn_like(mu))
    pooled = torch.stack([torch.relu(shifted_stencil(padded, kernel[0], height, width)).mean((2, 3))
                          for kernel in stat_kernels], -1)
    features = torch.cat([pooled.mean(0), pooled.var(0), descriptors.expand(channels, 2)], 1)
    scale = torch.sigmoid((features * scale_weight).sum(1))
    return h * scale.view(1, channels, 1, 1) * z


def attempt_compile(phi, x, upstream):
    args = (phi.identity_kernels, phi.mean_kernels, phi.stat_kernels, phi.scale_weight, torch.tensor([0.25, 1.0]))
    compiled = torch.compile(phi_as_shifts, dynamic=False)
    statistics_ = torch.zeros(x.shape[1], 4), torch.ones(x.shape[1], 4)
    start = time.perf_counter()
    compiled(x, *args).backward(upstream)
    compile_s = time.perf_counter() - start
    candidate, eager = interleaved_ms(lambda: compiled(x, *args).backward(upstream),
                                      lambda: phi(x, *statistics_, 64, 32).backward(upstream))
    return {"what": "forward + backward of one site", "compile_s": round(compile_s, 1)}, candidate, eager


def attempt_multiplier(phi, x, upstream):
    channels = x.shape[1]
    kernels = phi.stat_kernels.detach()
    weight = kernels.reshape(1, 4, 3, 3).expand(channels, 4, 3, 3).reshape(4 * channels, 1, 3, 3).contiguous()

    def multiplier():
        return F.conv2d(x, weight, padding=1, groups=channels).relu_().mean(dim=(2, 3))

    def separate():
        return [_stencil(x, kernel).relu_().mean(dim=(2, 3)) for kernel in kernels]

    candidate, eager = interleaved_ms(multiplier, separate)
    return {"what": "four pooled statistics of one site"}, candidate, eager


def attempt_cpp(phi, x, upstream):
    from torch.utils.cpp_extension import load_inline

    with tempfile.TemporaryDirectory() as build:
        start = time.perf_counter()
        extension = load_inline("metaperturb_fusion_attempt", cpp_sources=CPP_SOURCE,
                                functions=["hidden_and_statistics"], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                extra_ldflags=["-fopenmp"], build_directory=build)
        build_s = time.perf_counter() - start
    lam, gam = phi.identity_kernels[0].detach().contiguous(), phi.mean_kernels[0].detach().contiguous()
    stat = phi.stat_kernels.detach().contiguous()

    def fused():
        return extension.hidden_and_statistics(x, x.mean(1, keepdim=True).contiguous(), lam, gam, stat)

    def eager():
        channel_mean = x.mean(1, keepdim=True)
        hidden = _stencil(x, lam).add_(_stencil(channel_mean, gam)).relu_()
        return hidden, torch.stack([_stencil(x, kernel).relu_().mean(dim=(2, 3)) for kernel in stat], -1)

    for ours, theirs in zip(fused(), eager()):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    candidate, eager_ms = interleaved_ms(fused, eager)
    return ({"what": "hidden layer + four pooled statistics of one site", "build_s": round(build_s, 1)},
            candidate, eager_ms)


ATTEMPTS = {"compile": attempt_compile, "multiplier": attempt_multiplier, "cpp": attempt_cpp}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--only", default=",".join(ATTEMPTS), help="comma-separated subset of " + ",".join(ATTEMPTS))
    parser.add_argument("--output", help="append the JSON lines to this file too")
    args = parser.parse_args()
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig()).train().requires_grad_(False)
    shape = (BATCH, args.channels, SIZE, SIZE)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    for name in args.only.split(","):
        if name not in ATTEMPTS:
            parser.error(f"unknown attempt {name!r}; choose from {', '.join(ATTEMPTS)}")
        details, candidate_ms, eager_ms = ATTEMPTS[name](phi, x, upstream)
        line = json.dumps({"attempt": name, **details, "shape": list(shape), "candidate_ms": round(candidate_ms, 2),
                           "eager_ms": round(eager_ms, 2), "candidate_over_eager": round(candidate_ms / eager_ms, 2),
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d")})
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
