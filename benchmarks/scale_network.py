"""φ's scale network s, as in the rebuttal: its weights, how s depends on the site descriptors, and its distribution
per target dataset.

φ's channel scale is `s_c = sigmoid(w · [m_c (4), v_c (4), C / C_norm, H / H_norm])` (docs/method.md), where m and v
are the batch mean and variance of `u = mean_HW ReLU(K_j ⋆ h_c)`. For every φ the script

1. records its 10 weights w (`scale_weight`, named mean_1..4, var_1..4, channel, size) and plots them as grouped bars,
   one group per weight and one bar per φ: scale_network_weights.png;
2. sweeps the site descriptors: a heatmap per (φ, network) of s as a function of C / C_norm (x) and H / H_norm (y)
   on [0, 1]², with the statistics part w · [m, v] held at the values observed at the sites of the fresh network on
   the first target (cifar10 by default): each grid point is the mean of s over all (site, channel) statistics of
   that network, with only the descriptors replaced; white dots mark the network's real sites, labelled with their
   observed mean s (in forward order where sites share their descriptors): scale_network_descriptors.png;
3. for each target and network, runs one training-mode forward pass (κ = 1, batch statistics) of a FRESH network
   (seeded, at initialisation, never trained) over `--num-images` training images, collecting s per (site,
   channel), and plots one violin per target of all (site, channel) values of s, one panel per (φ, network):
   scale_network_targets.png. These are scales at initialisation, not in a trained network.

s is recomputed from each site's input by `statistics_features` and `channel_scale` (φ itself reports only the
per-site mean of s, `MetaPerturbModel.monitoring`); every site's recomputed mean is checked against φ's own to 1e-5.
Appends to benchmarks/results/scale_network.jsonl one line per φ (`"record": "scale_weight"`), per (φ, network) a
coarse 5 × 5 descriptor sweep (`"descriptor_sweep"`), and per (φ, target, network, site) the mean, std and quantiles
of s with its descriptors and logit parts (`"site"`).

    python benchmarks/scale_network.py [--targets NAME=PATH,...] [--archs resnet20,conv4]
        [--perturbations NAME=PATH,...]     # default: PERTURBATIONS of phi_statistics.py (hub_cards/ and the authors')
        [--num-images 128] [--seed 0]
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, normalize, to_tensors
from metaperturb_hf.methods import apply_method, build_classifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"
TARGETS = {"cifar10": DATA / "cifar10_32", "cub": DATA / "cub200_2011_first50_32",
           "omniglot": DATA / "omniglot_bg_small_32"}
QUANTILES = {"s_min": 0.0, "s_q05": 0.05, "s_q25": 0.25, "s_median": 0.5, "s_q75": 0.75, "s_q95": 0.95, "s_max": 1.0}


def _sibling(name: str):
    """A script of this folder as a module (the benchmarks folder is no package, and a test imports this file)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PERTURBATIONS = _sibling("phi_statistics").PERTURBATIONS


def weight_names(num_stat_filters: int = 4) -> list[str]:
    """The names of `scale_weight`'s entries, in its order [mean × F, var × F, channel, size]."""
    return ([f"mean_{j}" for j in range(1, num_stat_filters + 1)]
            + [f"var_{j}" for j in range(1, num_stat_filters + 1)]
            + ["channel", "size"])


def statistics_features(hidden_states: torch.Tensor, stat_kernels: torch.Tensor) -> torch.Tensor:
    """[m_c, v_c] of training mode, shape (C, 2F): the batch mean and unbiased batch variance (0 for a batch of one)
    of `u[b, c, j] = mean_HW ReLU(K_j ⋆ h[b, c])`, zero padding k // 2. A (B, C) feature is a (B, C, 1, 1) map."""
    h = hidden_states.detach().float()
    if h.dim() == 2:
        h = h[:, :, None, None]
    batch, channels, height, width = h.shape
    kernels = stat_kernels.detach().float()
    responses = F.conv2d(h.reshape(batch * channels, 1, height, width), kernels, padding=kernels.shape[-1] // 2)
    pooled = responses.relu().mean(dim=(2, 3)).view(batch, channels, -1)
    variance = pooled.var(dim=0) if batch > 1 else torch.zeros_like(pooled[0])
    return torch.cat([pooled.mean(dim=0), variance], dim=1)


def channel_scale(scale_weight: torch.Tensor, features: torch.Tensor, channel_descriptor: float,
                  size_descriptor: float) -> torch.Tensor:
    """s = sigmoid(w · [features, C / C_norm, H / H_norm]) for every row of `features` (N, 2F): shape (N,)."""
    w = scale_weight.detach().float()
    n = features.shape[-1]
    return torch.sigmoid(features @ w[:n] + w[n] * channel_descriptor + w[n + 1] * size_descriptor)


def descriptor_sweep(scale_weight: torch.Tensor, features: torch.Tensor, channel_grid: torch.Tensor,
                     size_grid: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of `features` (N, 2F) of s with the descriptors replaced by every grid point:
    shape (len(size_grid), len(channel_grid)), rows H / H_norm, columns C / C_norm."""
    w = scale_weight.detach().float()
    n = features.shape[-1]
    logits = ((features @ w[:n])[None, None, :] + w[n] * channel_grid[None, :, None]
              + w[n + 1] * size_grid[:, None, None])
    return torch.sigmoid(logits).mean(dim=-1)


def site_scales(model, images: torch.Tensor) -> list[dict]:
    """One training-mode forward of a wrapped `model` (its κ as set) over `images`. Per site, in call order: its name,
    shape, descriptors, statistics features (C, 2F), s per channel (C,), and φ's own mean s (`phi_mean_s`)."""
    records, perturb, phi = [], model._perturb, model.perturbation

    def recording(site, key, hidden_states):
        channels = hidden_states.shape[1]
        size = hidden_states.shape[2] if hidden_states.dim() == 4 else 1
        descriptors = (channels / model.channel_norm, size / model.spatial_norm)
        features = statistics_features(hidden_states, phi.stat_kernels)
        records.append({"site": site.name, "channels": channels, "spatial_size": size,
                        "channel_descriptor": descriptors[0], "size_descriptor": descriptors[1],
                        "features": features, "s": channel_scale(phi.scale_weight, features, *descriptors)})
        return perturb(site, key, hidden_states)

    model._perturb = recording
    model.train()
    try:
        with torch.no_grad(), phi.monitoring() as calls:
            model(images)
    finally:
        del model._perturb
    for record, (scale, _) in zip(records, calls, strict=True):
        record["phi_mean_s"] = scale.item()
    return records


def site_summary(record: dict, scale_weight: torch.Tensor) -> dict:
    """The JSON-ready statistics of one site's s, and its logit split into the statistics and descriptor parts."""
    s, w = record["s"], scale_weight.detach().float()
    n = record["features"].shape[1]
    return {
        "site": record["site"], "channels": record["channels"], "spatial_size": record["spatial_size"],
        "channel_descriptor": record["channel_descriptor"], "size_descriptor": record["size_descriptor"],
        "s_mean": s.mean().item(), "s_std": s.std().item() if len(s) > 1 else 0.0,
        **{key: torch.quantile(s, q).item() for key, q in QUANTILES.items()},
        "statistics_logit_mean": (record["features"] @ w[:n]).mean().item(),
        "descriptor_logit": (w[n] * record["channel_descriptor"] + w[n + 1] * record["size_descriptor"]).item(),
        "phi_mean_s": record["phi_mean_s"],
    }


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (it is optional here): no figures; `pip install matplotlib` for them.")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weights(weights: dict[str, list[float]], output: Path) -> None:
    """Grouped bars: one group per entry of w, one bar per φ."""
    plt = _pyplot()
    if plt is None:
        return
    names = weight_names((len(next(iter(weights.values()))) - 2) // 2)
    figure, axis = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(weights)
    for i, (phi, values) in enumerate(weights.items()):
        axis.bar([x + (i - (len(weights) - 1) / 2) * width for x in range(len(names))], values, width, label=phi)
    axis.axhline(0, color="black", linewidth=0.8)
    for boundary in (3.5, 7.5):
        axis.axvline(boundary, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xticks(range(len(names)), names)
    axis.set_xlabel("entry of w (statistics filter j for mean_j / var_j; the two site descriptors last)")
    axis.set_ylabel("weight value")
    axis.set_title("φ's scale network: s_c = sigmoid(w · [m_c, v_c, C / C_norm, H / H_norm]), no bias")
    axis.legend(title="φ", fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=130)
    plt.close(figure)
    print(f"wrote {output}")


def plot_descriptors(sweeps: dict[tuple[str, str], dict], grid: torch.Tensor, statistics_from: str,
                     output: Path) -> None:
    """Per (φ, network) a heatmap of the mean s over (C / C_norm, H / H_norm), the real sites marked."""
    plt = _pyplot()
    if plt is None:
        return
    phis = list(dict.fromkeys(phi for phi, _ in sweeps))
    archs = list(dict.fromkeys(arch for _, arch in sweeps))
    figure, axes = plt.subplots(len(phis), len(archs), figsize=(4.4 * len(archs) + 1, 3.7 * len(phis)),
                                squeeze=False, constrained_layout=True)
    image = None
    for (phi, arch), sweep in sweeps.items():
        axis = axes[phis.index(phi)][archs.index(arch)]
        lo, hi = grid[0].item(), grid[-1].item()
        image = axis.imshow(sweep["mean_s"], origin="lower", extent=(lo, hi, lo, hi), vmin=0, vmax=1, cmap="viridis",
                            aspect="auto")
        contours = axis.contour(grid, grid, sweep["mean_s"], colors="white", linewidths=0.6, alpha=0.8)
        axis.clabel(contours, fontsize=8, fmt="%.3f")
        by_descriptors = {}  # sites that share their descriptors (a ResNet stage) get one dot, their s listed
        for c, h, s in sweep["sites"]:
            by_descriptors.setdefault((c, h), []).append(s)
        for (c, h), scales in by_descriptors.items():
            axis.plot(c, h, "o", color="white", markeredgecolor="black", markersize=6, clip_on=False, zorder=3)
            axis.annotate("s: " + ", ".join(f"{s:.3f}" for s in scales), (c, h), textcoords="offset points",
                          xytext=(-6 if c > 0.5 else 6, -6 if h > 0.5 else 6), fontsize=7,
                          ha="right" if c > 0.5 else "left", va="top" if h > 0.5 else "bottom",
                          bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "linewidth": 0})
        axis.set_title(f"φ {phi} · {arch}", fontsize=9)
        axis.set_xlabel("C / C_norm")
        axis.set_ylabel("H / H_norm")
    figure.colorbar(image, ax=axes, label="mean s over the observed (site, channel) statistics", shrink=0.6)
    figure.suptitle(f"Mean s against the site descriptors, the statistics part w · [m, v] held at its values at all\n"
                    f"(site, channel) of a fresh network on {statistics_from}; dots: the real sites, labelled with "
                    "their own mean s", fontsize=10)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    print(f"wrote {output}")


def plot_targets(values: dict[tuple[str, str, str], torch.Tensor], output: Path) -> None:
    """Per (φ, network) one violin per target of s over all (site, channel) of one forward."""
    plt = _pyplot()
    if plt is None:
        return
    phis = list(dict.fromkeys(key[0] for key in values))
    archs = list(dict.fromkeys(key[2] for key in values))
    targets = list(dict.fromkeys(key[1] for key in values))
    figure, axes = plt.subplots(len(phis), len(archs), figsize=(4.6 * len(archs), 2.9 * len(phis)), squeeze=False)
    for row, phi in enumerate(phis):
        for column, arch in enumerate(archs):
            axis = axes[row][column]
            present = [t for t in targets if (phi, t, arch) in values]
            data = [values[(phi, t, arch)].numpy() for t in present]
            parts = axis.violinplot(data, showmedians=True, showextrema=True)
            for body, color in zip(parts["bodies"], plt.rcParams["axes.prop_cycle"].by_key()["color"]):
                body.set_facecolor(color)
                body.set_alpha(0.6)
            axis.set_xticks(range(1, len(present) + 1), present)
            axis.set_title(f"φ {phi} · {arch}", fontsize=9)
            axis.set_ylabel("s (all sites × channels)")
            axis.grid(axis="y", alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("target dataset")
    figure.suptitle("Distribution of the channel scale s per target: one training-mode forward of a FRESH (untrained) "
                    "network, κ = 1 (bar: median)", fontsize=10)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    print(f"wrote {output}")


def _named_paths(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(","))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(f"{name}={path}" for name, path in TARGETS.items()),
                        help="NAME=PATH,... of Parquet folders with a train split; the first one's statistics feed "
                             "the descriptor sweep")
    parser.add_argument("--archs", default="resnet20,conv4")
    parser.add_argument("--perturbations", help="NAME=PATH,... (default: every φ of phi_statistics.py)")
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "scale_network.jsonl"))
    parser.add_argument("--figures", default=str(RESULTS), help="folder of the three PNGs")
    args = parser.parse_args()
    chosen = _named_paths(args.perturbations) if args.perturbations else PERTURBATIONS
    targets, archs = _named_paths(args.targets), args.archs.split(",")
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)

    data = {}
    for target, path in targets.items():
        train = to_tensors(load_image_dataset(path, "train"))
        torch.manual_seed(args.seed)
        data[target] = (normalize(train.images[torch.randperm(len(train))[:args.num_images]]), len(train.class_names))

    grid = torch.linspace(0, 1, 41)
    coarse = torch.linspace(0, 1, 5)
    weights, sweeps, values = {}, {}, {}
    with open(args.output, "a") as out:
        def write(line):
            out.write(json.dumps(line) + "\n")

        for name, path in chosen.items():
            if not Path(path).exists():
                print(f"skipping {name}: {path} is absent")
                continue
            scale_weight = load_perturbation(path).scale_weight.detach().float()
            weights[name] = scale_weight.tolist()
            names = weight_names((len(scale_weight) - 2) // 2)
            write({"record": "scale_weight", "phi": name,
                   "scale_weight": dict(zip(names, weights[name], strict=True))})
            print(f"\n{name}: w = " + ", ".join(f"{n} {v:+.3f}" for n, v in zip(names, weights[name])))
            for arch in archs:
                for target, (images, num_classes) in data.items():
                    model = apply_method(build_classifier(arch, num_classes, images.shape[-1], seed=args.seed),
                                         "metaperturb", images.shape[-1], load_perturbation(path))
                    model.set_noise_coeff(1.0)
                    torch.manual_seed(args.seed)
                    records = site_scales(model, images)
                    for record in records:
                        if abs(record["s"].mean().item() - record["phi_mean_s"]) > 1e-5:
                            raise RuntimeError(f"{name} {arch} {target} {record['site']}: recomputed mean s "
                                               f"{record['s'].mean().item()} but φ applied {record['phi_mean_s']}")
                        write({"record": "site", "phi": name, "target": target, "arch": arch,
                               "num_images": len(images), "seed": args.seed, **site_summary(record, scale_weight)})
                    values[(name, target, arch)] = all_s = torch.cat([record["s"] for record in records])
                    print(f"  {arch:9s} {target:9s} s over {len(records)} sites × channels: mean {all_s.mean():.4f} "
                          f"median {all_s.median():.4f} [q05 {torch.quantile(all_s, 0.05):.4f}, "
                          f"q95 {torch.quantile(all_s, 0.95):.4f}]; per site "
                          + " ".join(f"{record['s'].mean():.3f}" for record in records))
                    if target == next(iter(data)):  # the descriptor sweep holds the first target's statistics
                        features = torch.cat([record["features"] for record in records])
                        sites = [(r["channel_descriptor"], r["size_descriptor"], r["s"].mean().item())
                                 for r in records]
                        sweeps[(name, arch)] = {"mean_s": descriptor_sweep(scale_weight, features, grid, grid),
                                                "sites": sites}
                        write({"record": "descriptor_sweep", "phi": name, "arch": arch, "statistics_from": target,
                               "grid": coarse.tolist(), "rows": "size_descriptor", "columns": "channel_descriptor",
                               "mean_s": descriptor_sweep(scale_weight, features, coarse, coarse).tolist()})
    if weights:
        plot_weights(weights, figures / "scale_network_weights.png")
        plot_descriptors(sweeps, grid, next(iter(data)), figures / "scale_network_descriptors.png")
        plot_targets(values, figures / "scale_network_targets.png")


if __name__ == "__main__":
    main()
