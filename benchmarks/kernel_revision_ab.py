r"""The CPU kernel of this working tree against that of an earlier revision, in the same rounds: φ's single pass, one
sampled pass and a training step (forward and backward, φ frozen) of a whole network, each over the plain network's.

The earlier revision's `phi_cpu.cpp` is built with its own compiler flags (from its `loading.py`) into a separate
extension; both modules then serve the same perturbed network in turn (batch 128, 32×32, channels-last, one thread
unless OMP_NUM_THREADS says otherwise), round after round (`overhead.interleaved`). One JSON line per network and
measure: the medians, the ratios to the plain network's time and this tree's time over the revision's.

    python benchmarks/kernel_revision_ab.py --base 684f8ec \
        --output benchmarks/results/kernel_revision_ab_cpu.jsonl
    python benchmarks/kernel_revision_ab.py --base HEAD --base-cflags=-mprefer-vector-width=512   # a build flag

Records carry `THP_MEM_ALLOC_ENABLE` (PyTorch's switch for huge pages in its CPU allocations), which changes the plain
network's time as much as φ's.
"""

import argparse
import ast
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from overhead import interleaved  # the same interleaved medians (this folder is on sys.path when run as a script)
from torch.utils.cpp_extension import load

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.kernels import loading

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "metaperturb_hf/kernels/phi_cpu.cpp"


def build_revision(revision: str, directory: Path, extra_flags: tuple[str, ...] = ()):
    """The CPU kernel as `revision` had it, built with that revision's flags and `extra_flags`."""
    source = subprocess.run(["git", "show", f"{revision}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    loading_py = subprocess.run(["git", "show", f"{revision}:metaperturb_hf/kernels/loading.py"], cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout
    flags = ast.literal_eval(re.search(r"^_FLAGS = (\[.*?\])", loading_py, re.M | re.S).group(1)) + list(extra_flags)
    path = directory / "phi_cpu_base.cpp"
    path.write_text(source)
    name = "metaperturb_phi_cpu_" + re.sub(r"\W", "_", " ".join([revision, *extra_flags]))
    return load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision whose kernel to compare against")
    parser.add_argument("--base-cflags", default="",
                        help="compiler flags added to the revision's own, space-separated (a flag against the same "
                             "source: --base HEAD --base-cflags=-mprefer-vector-width=512)")
    parser.add_argument("--archs", default="conv4,resnet20")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--output", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    current = loading.extension("cpu")
    if current is None:
        parser.error(f"this tree's CPU kernel did not build: {loading.states['cpu'].get('error')}")
    with tempfile.TemporaryDirectory() as directory:
        base = build_revision(args.base, Path(directory), tuple(args.base_cflags.split()))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    for arch in args.archs.split(","):
        for record in compare(arch, base, current, args.repeats):
            record |= {"base": args.base, "base_cflags": args.base_cflags, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "started": started,
                       "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
            print(json.dumps(record))
            if args.output:
                with open(args.output, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


def compare(arch: str, base, current, repeats: int) -> list[dict]:
    """Per measure ("mean": the single pass; "sample": one sampled pass; "train": a training step's forward and
    backward, φ frozen and sampling) the medians of the plain network's and of the perturbed network's on each kernel
    module, timed in the same rounds."""
    torch.manual_seed(0)
    plain = create_model(arch, 10).to(memory_format=torch.channels_last)
    twin = create_model(arch, 10).to(memory_format=torch.channels_last)
    twin.load_state_dict(plain.state_dict())
    phi = MetaPerturbModel(MetaPerturbConfig())
    phi.kernel = "cpu"
    perturbed = add_perturbation(twin, phi)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def forward(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    def train_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return run

    def on(module, function):
        def run():
            loading.states["cpu"]["module"] = module
            function()
        return run

    records = []
    for measure, runner in (("mean", forward), ("sample", forward), ("train", train_step)):
        training = measure == "train"
        plain.train(training)
        perturbed.train(training)
        perturbed.set_noise_mode("mean" if measure == "mean" else "sample")
        run = runner(perturbed)
        plain_s, base_s, current_s = interleaved([runner(plain), on(base, run), on(current, run)],
                                                 torch.device("cpu"), repeats)
        loading.states["cpu"]["module"] = current
        records.append({"arch": arch, "mode": measure, "plain_s": plain_s, "base_s": base_s, "current_s": current_s,
                        "base_ratio": base_s / plain_s, "current_ratio": current_s / plain_s,
                        "current_vs_base": current_s / base_s})
    return records


if __name__ == "__main__":
    main()
