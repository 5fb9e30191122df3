r"""The CPU kernel of this working tree against that of an earlier revision, in the same rounds: φ's single pass and
one sampled pass of a whole network, each over a plain forward.

The earlier revision's `phi_cpu.cpp` is built with its own compiler flags (from its `loading.py`) into a separate
extension; both modules then serve the same perturbed network in turn (batch 128, 32×32, channels-last, no grad,
one thread unless OMP_NUM_THREADS says otherwise), round after round (`overhead.interleaved`). One JSON line per
network and mode: the medians, the ratios to the plain forward and this tree's time over the revision's.

    python benchmarks/kernel_revision_ab.py --base 684f8ec \
        --output benchmarks/results/kernel_revision_ab_cpu.jsonl
"""

import argparse
import ast
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from overhead import interleaved  # the same interleaved medians (this folder is on sys.path when run as a script)
from torch.utils.cpp_extension import load

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.kernels import loading

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "metaperturb_hf/kernels/phi_cpu.cpp"


def build_revision(revision: str, directory: Path):
    """The CPU kernel as `revision` had it, built with that revision's flags."""
    source = subprocess.run(["git", "show", f"{revision}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    loading_py = subprocess.run(["git", "show", f"{revision}:metaperturb_hf/kernels/loading.py"], cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout
    flags = ast.literal_eval(re.search(r"^_FLAGS = (\[.*?\])", loading_py, re.M | re.S).group(1))
    path = directory / "phi_cpu_base.cpp"
    path.write_text(source)
    name = "metaperturb_phi_cpu_" + re.sub(r"\W", "_", revision)
    return load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision whose kernel to compare against")
    parser.add_argument("--archs", default="conv4,resnet20")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--output", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    current = loading.extension("cpu")
    if current is None:
        parser.error(f"this tree's CPU kernel did not build: {loading.states['cpu'].get('error')}")
    with tempfile.TemporaryDirectory() as directory:
        base = build_revision(args.base, Path(directory))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    for arch in args.archs.split(","):
        for record in compare(arch, base, current, args.repeats):
            record |= {"base": args.base, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "started": started}
            print(json.dumps(record))
            if args.output:
                with open(args.output, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


def compare(arch: str, base, current, repeats: int) -> list[dict]:
    """Per noise mode ("mean": the single pass; "sample": one sampled pass) the medians of a plain forward and of
    the perturbed network's forward on each kernel module, timed in the same rounds."""
    torch.manual_seed(0)
    plain = create_model(arch, 10).to(memory_format=torch.channels_last).eval()
    twin = create_model(arch, 10).to(memory_format=torch.channels_last)
    twin.load_state_dict(plain.state_dict())
    phi = MetaPerturbModel(MetaPerturbConfig())
    phi.kernel = "cpu"
    perturbed = add_perturbation(twin, phi).eval()
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def on(module):
        def forward():
            loading.states["cpu"]["module"] = module
            perturbed(x)
        return forward

    records = []
    for mode in ("mean", "sample"):
        perturbed.set_noise_mode(mode)
        with torch.no_grad():
            plain_s, base_s, current_s = interleaved([lambda: plain(x), on(base), on(current)], torch.device("cpu"),
                                                     repeats)
        loading.states["cpu"]["module"] = current
        records.append({"arch": arch, "mode": mode, "plain_s": plain_s, "base_s": base_s, "current_s": current_s,
                        "base_ratio": base_s / plain_s, "current_ratio": current_s / plain_s,
                        "current_vs_base": current_s / base_s})
    return records

if __name__ == "__main__":
    main()
