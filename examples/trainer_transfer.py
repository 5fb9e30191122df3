r"""Train a `transformers` image classifier on a `datasets` dataset with `transformers.Trainer` and a frozen φ.

    python examples/trainer_transfer.py --dataset ../shared/data/cub200_2011_first50_32 \
        --perturbation hub_cards/metaperturb-tin-resnet20 --max_steps 1500 --output_dir trainer-cub

The classifier: `--hf_model`, a transformers checkpoint or config of an image classifier (hub id or folder; a config
alone, or a checkpoint whose head has another number of classes, starts that part from scratch); by default a
CIFAR-sized `ResNetForImageClassification` (16-32-64 channels, three basic blocks per stage). `add_perturbation` puts
φ after every residual block; `MetaPerturbCallback` anneals the noise over the first 40 % of the steps. After training
the script reports the test accuracy with the softmax averaged over `--mc_samples` noise draws and with the single pass
(calibrated, then given the candidate statistics that agree most with MC), and saves the perturbed model with
`save_pretrained` in `--output_dir`.

Every `TrainingArguments` field is a flag; the defaults differ from the Trainer's where a network trained from
scratch on small images needs it (learning rate 1e-3, weight decay 5e-4, batch 128, 1500 steps). `--resume` continues
from the newest Trainer checkpoint in `--output_dir`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

from metaperturb_hf import add_perturbation, load_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.data import augment, load_image_dataset, normalize, to_tensors
from metaperturb_hf.evaluation import evaluate
from metaperturb_hf.transfer import MetaPerturbCallback


@dataclass
class ScriptArguments:
    dataset: str = field(metadata={"help": "hub id, Parquet folder/glob/file, or imagefolder directory"})
    perturbation: str = field(metadata={"help": "φ: a save_pretrained folder, a hub repo, or the authors' .pth"})
    hf_model: str | None = field(default=None, metadata={"help": (
        "transformers checkpoint or config of an image classifier (default: a CIFAR-sized ResNet)")})
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    image_size: int = field(default=32, metadata={"help": "images are resized to this size"})
    mc_samples: int = field(default=10, metadata={"help": "noise samples averaged at test time"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --output_dir"})


def build_classifier(hf_model: str | None, num_labels: int) -> torch.nn.Module:
    """`hf_model` (its weights where it has them), or by default a CIFAR-sized ResNet."""
    if hf_model is not None:
        return create_model(f"hf:{hf_model}", num_labels)
    return ResNetForImageClassification(ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64], depths=[3, 3, 3], layer_type="basic", num_labels=num_labels))


def image_transform(args: ScriptArguments, train: bool, seed: int = 0):
    """A `datasets` transform: resized uint8 RGB → (padded random crop and flip when training) → normalised."""
    generator = torch.Generator().manual_seed(seed)

    def transform(batch: dict) -> dict:
        pixels = np.stack([np.asarray(image.convert("RGB").resize((args.image_size,) * 2))
                           for image in batch[args.image_column]])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        if train:
            images = augment(images, generator)
        return {"pixel_values": normalize(images), "labels": torch.as_tensor(batch[args.label_column])}

    return transform


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, TrainingArguments), description=__doc__)
    parser.set_defaults(learning_rate=1e-3, weight_decay=5e-4, per_device_train_batch_size=128, max_steps=1500,
                        output_dir="trainer-transfer-output", report_to="none", remove_unused_columns=False,
                        save_total_limit=2)
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    train = load_image_dataset(args.dataset, args.train_split, args.image_column, args.label_column)
    num_labels = len(set(train[args.label_column]))
    model = add_perturbation(build_classifier(args.hf_model, num_labels), load_perturbation(args.perturbation),
                             input_size=(3, args.image_size, args.image_size))
    print(f"φ at {len(model.sites)} sites: {', '.join(site.name for site in model.sites)}")

    trainer = Trainer(model=model, args=training_args, train_dataset=train.with_transform(image_transform(args, True)),
                      callbacks=[MetaPerturbCallback()])
    trainer.train(resume_from_checkpoint=args.resume or None)

    test = to_tensors(load_image_dataset(args.dataset, args.test_split, args.image_column, args.label_column),
                      args.image_column, args.label_column, args.image_size)
    model.eval()
    results = {"mc": evaluate(model, test, num_samples=args.mc_samples, input_name="pixel_values")}
    calibration = trainer.get_train_dataloader()  # training images (augmented) for the single pass's BatchNorm
    model.calibrate_single_pass(({"pixel_values": batch["pixel_values"]} for batch in calibration), num_batches=50)
    choice = model.choose_single_pass_statistics(({"pixel_values": batch["pixel_values"]} for batch in calibration),
                                                 num_samples=max(2, args.mc_samples), num_batches=50)
    model.set_noise_mode("mean")
    results["single_pass"] = {**evaluate(model, test, input_name="pixel_values"), **choice}
    for mode, record in results.items():
        print(f"{mode:12s} test accuracy {100 * record['accuracy']:.2f} %  "
              f"(NLL {record['nll']:.3f}, ECE {record['ece']:.3f})")
    output = Path(training_args.output_dir)
    model.save_pretrained(output / "perturbed-model")
    (output / "transfer_results.json").write_text(json.dumps(results, indent=2))
    print(f"Wrote {output / 'perturbed-model'} and {output / 'transfer_results.json'}")


if __name__ == "__main__":
    main()
