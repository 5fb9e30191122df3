"""Regenerate the model cards (README.md) of hub_cards/ from the released φ and the transfer records.

    python scripts/write_cards.py                      # the committed cards
    python scripts/write_cards.py --namespace my-org   # usage snippets that load my-org/<name>, to publish

Every folder with weights gets its card from its meta_training.json, its weights' sha256 and the transfer records
whose `source` is the folder name without "metaperturb-" (as in `benchmark.py --perturbations
tin-conv4=hub_cards/metaperturb-tin-conv4`): every benchmark JSONL in benchmarks/results/ and the quick start's
records. hub_cards/metaperturb-authors-tin-resnet20/ gets a card without weights that explains how to convert the
authors' checkpoint (records with source "authors-tin-resnet20" appear on it). Rerun it after new records:
tests/test_hub_cards.py fails while a card differs from what this script writes.
"""

import argparse
from pathlib import Path

from huggingface_hub import ModelCard

from metaperturb_hf.hub import CARD_NAME, WEIGHTS_NAME, build_model_card, card_for_folder, source_name
from metaperturb_hf.results import has_run_key, load_records

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "hub_cards"
RESULTS = ROOT / "benchmarks" / "results"
QUICKSTART = RESULTS / "quickstart" / "quickstart_results.json"
AUTHORS = "metaperturb-authors-tin-resnet20"
AUTHORS_CHECKPOINT = "official_tin_resnet20_perturb_750.pth"
AUTHORS_CHECKPOINT_SHA256 = "63f47f80b32a00840b3af0b84ae778543de27c7eb9450d76261bfacad182211f"
# The authors' run as the paper's protocol describes it (the step count is also in the file name).
AUTHORS_META_TRAINING = {
    "source_dataset": "Tiny ImageNet (train split)",
    "num_tasks": 10,
    "classes_per_task": [40] * 10,
    "architectures": ["resnet20"],
    "steps": 750,
    "batch_size": 128,
    "learning_rate": 0.001,
    "weight_decay": 0.0005,
    "image_size": 32,
    "lookahead": False,
    "num_processes": 10,
    "produced_by": "the authors' code (5 class-disjoint groups of 40 classes, two tasks each, 10 processes on 5 GPUs)",
    "note": "The paper keeps the best of 5 meta-training runs by a held-out validation set.",
}
CONVERSION = f"""No weights in this repository: this card describes the authors' released checkpoint
`{AUTHORS_CHECKPOINT}` (sha256 `{AUTHORS_CHECKPOINT_SHA256}`), meta-trained by them. Convert it
with the library's converter, which reads it with `torch.load(weights_only=True)` (no pickled code runs) and writes
a `save_pretrained` folder:

```bash
python -m metaperturb_hf.convert {AUTHORS_CHECKPOINT} {AUTHORS}
```"""


def default_results() -> dict[str, list[dict]]:
    """Transfer records by file (relative to the repository): the quick start and every benchmark JSONL."""
    results = {str(QUICKSTART.relative_to(ROOT)): load_records(QUICKSTART)}
    for path in sorted(RESULTS.glob("*.jsonl")):
        records = load_records(path)
        if has_run_key(records):
            results[str(path.relative_to(ROOT))] = records
    return results


def build_cards(results: dict[str, list[dict]], namespace: str = "hub_cards") -> dict[Path, ModelCard]:
    """The card of every folder in hub_cards/ that holds weights, and the authors' card."""
    cards = {folder: card_for_folder(folder, folder.name, results, source_name(folder), f"{namespace}/{folder.name}")
             for folder in sorted(CARDS.iterdir()) if (folder / WEIGHTS_NAME).is_file()}
    cards[CARDS / AUTHORS] = build_model_card(AUTHORS_META_TRAINING, results, model_name=AUTHORS, location=AUTHORS,
                                              source=source_name(AUTHORS), obtain=CONVERSION, license="unknown")
    return cards


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", default="hub_cards",
                        help="snippets load <namespace>/<name>: hub_cards (the local folders) or a hub namespace")
    args = parser.parse_args(argv)
    for folder, card in build_cards(default_results(), args.namespace).items():
        folder.mkdir(exist_ok=True)
        card.save(folder / CARD_NAME)
        print(f"wrote {(folder / CARD_NAME).relative_to(ROOT)} ({len(card.data.eval_results or [])} eval results)")


if __name__ == "__main__":
    main()
