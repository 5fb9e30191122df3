"""Optional fused kernels for φ, reached lazily by the modeling code, which falls back to eager without them.

Two implementations of the custom ops `metaperturb::phi_forward` / `metaperturb::phi_backward` (so `torch.compile`
traces through φ), each computing one site's forward and backward in a few passes over the feature map instead of the
~57 full-size kernel launches of the eager path. Both save only the input and recompute the rest in the backward, and
draw the noise from a counter-based generator keyed by a per-call seed and each element's index, so the backward
regenerates it; an explicit `noise=` is honoured.

- `cpu` (`phi_cpu.cpp`): one pass per direction (plus one for the batch statistics), image by image in cache,
  Philox4x32-10. A C++ extension built on first use with `torch.utils.cpp_extension.load` (cached under
  `$TORCH_EXTENSIONS_DIR` or `~/.cache/metaperturb_hf`).
- `triton` (`phi_triton.py`, `pip install metaperturb-hf[triton]`): Triton kernels for CUDA tensors, noise from
  `tl.randn`. The seed is a tensor on the device and nothing waits for the device, so CUDA graphs can capture φ.
  Under Triton's interpreter (`TRITON_INTERPRET=1` before the kernels are first used) it takes CPU tensors instead:
  how it is tested without a GPU.

Which path runs: `METAPERTURB_KERNEL=auto|eager|cpu|triton` (or `phi.kernel` / `phi(..., kernel=...)`). `auto` takes
the kernel of the features' device (`triton` on CUDA, `cpu` elsewhere) where it loads and passed a one-time self-check
against eager, else eager with one log line saying why; `cpu` and `triton` insist (an error if that kernel cannot be
loaded or fails the check). Either way a kernel only takes what it implements: float32/float64 features on its device
with φ in the same precision, 3×3 kernels and four statistics filters, drawn or explicit noise or the expected-noise
mode of the single pass (eager's 8-node Gauss–Hermite rule: the CPU kernel shares one exponential among the nodes),
and for Triton at most 4096 channels (a tile holds every channel of its pixels). Other devices and dtypes, another node
count, and a backward that is itself differentiated (create_graph, lookahead meta-training: it reruns φ's eager math
on the same noise) use the eager code.
"""

from .dispatch import availability, select, unsupported
from .ops import perturb, phi_backward, phi_forward

__all__ = ["availability", "perturb", "phi_backward", "phi_forward", "select", "unsupported"]
