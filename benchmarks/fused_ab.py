"""A second opinion on benchmarks/overhead.py's central numbers, with nothing else in the process: a plain, an eager-φ
and a fused-φ network timed in turn (interleaved medians), for a frozen-φ training step and for MC-1 / MC-5
evaluation.

    python benchmarks/fused_ab.py [--archs resnet20,conv4] [--repeats 7] [--output results.jsonl]

Three networks and six timings: short enough to run when the machine is idle, which a ratio of two medians needs.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from overhead import interleaved  # the same interleaved medians (this folder is on sys.path when run as a script)

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.evaluation import predict_proba

BATCH, SIZE, CLASSES = 128, 32, 40


def build(arch: str, kernel: str | None):
    torch.manual_seed(0)
    net = create_model(arch, CLASSES).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    if kernel is None:
        return net, optimizer
    phi = MetaPerturbModel(MetaPerturbConfig())
    phi.kernel = kernel
    return add_perturbation(net, phi), optimizer


def medians(functions: dict, repeats: int) -> dict[str, float]:
    return dict(zip(functions, interleaved(list(functions.values()), torch.device("cpu"), repeats, warmup=1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet20,conv4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", help="append the JSON lines to this file too")
    args = parser.parse_args()
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (BATCH,))
    for arch in args.archs.split(","):
        models = {name: build(arch, kernel)
                  for name, kernel in (("plain", None), ("eager", "eager"), ("fused", "cpu"))}

        def train_step(model, optimizer):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps = medians({name: (lambda m=m, o=o: train_step(m, o)) for name, (m, o) in models.items()}, args.repeats)
        plain, fused = models["plain"][0], models["fused"][0]
        evals = medians({"plain": lambda plain=plain, x=x: predict_proba(plain, x, batch_size=BATCH),
                         "fused_mc1": lambda fused=fused, x=x: predict_proba(fused, x, num_samples=1,
                                                                             batch_size=BATCH),
                         "fused_mc5": lambda fused=fused, x=x: predict_proba(fused, x, num_samples=5,
                                                                             batch_size=BATCH)},
                        args.repeats)
        record = {
            "arch": arch, "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "train_step_s": steps, "eval_s": evals,
            "frozen_eager_vs_plain": steps["eager"] / steps["plain"],
            "frozen_fused_vs_plain": steps["fused"] / steps["plain"],
            "mc1_fused_vs_plain": evals["fused_mc1"] / evals["plain"],
            "mc5_vs_mc1_fused": evals["fused_mc5"] / evals["fused_mc1"],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
