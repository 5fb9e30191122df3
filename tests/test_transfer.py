"""Transfer training: the schedule, our loop with a frozen φ, and the Trainer callback."""

import datasets
import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.data import ImageTensors
from metaperturb_hf.transfer import (
    MetaPerturbCallback,
    TransferConfig,
    learning_rate_factor,
    noise_coeff_at,
    train_classifier,
)


def separable_data(n_per_class=16, classes=3, size=16):
    """Each class is a bright square in its own corner: learnable in a few dozen steps."""
    images = torch.randint(0, 60, (n_per_class * classes, 3, size, size), dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    for c in range(classes):
        r, q = divmod(c, 2)
        images[labels == c, :, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8] = 250
    return ImageTensors(images, labels, [f"c{c}" for c in range(classes)])


def test_noise_coeff_grows_linearly_over_the_first_40_percent():
    assert [noise_coeff_at(s, 100) for s in (0, 10, 20, 40, 41, 99)] == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]


def test_a_weaker_noise_strength_scales_the_whole_schedule():
    assert [noise_coeff_at(s, 100, noise_strength=0.5) for s in (0, 20, 40, 99)] == [0.0, 0.25, 0.5, 0.5]


def test_learning_rate_drops_by_0_3_at_40_70_90_percent():
    factors = [learning_rate_factor(s, 100) for s in (0, 39, 40, 69, 70, 89, 90, 99)]
    assert factors == pytest.approx([1, 1, 0.3, 0.3, 0.09, 0.09, 0.027, 0.027])


def test_our_loop_learns_anneals_kappa_and_keeps_phi_frozen():
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig())
    before = [p.clone() for p in phi.parameters()]
    model = add_perturbation(create_model("conv4", num_classes=3, image_size=16), phi, input_size=(3, 16, 16))
    data = separable_data()
    kappas = []
    original = model.set_noise_coeff
    model.set_noise_coeff = lambda k: kappas.append(k) or original(k)
    result = train_classifier(model, data, TransferConfig(steps=40, batch_size=16, log_every=1), progress=False)
    assert kappas[0] == 0.0 and kappas[16] == 1.0 and kappas[8] == pytest.approx(0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, phi.parameters()))
    losses = [record["loss"] for record in result["history"]]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert result["history"][-1]["lr"] == pytest.approx(1e-3 * 0.3**3)
    assert not model.training
    model.set_noise_coeff(0.0)  # the classifier itself learned the task under the (untrained) φ's noise
    accuracy = (model(data.images.float() / 127.5 - 1).argmax(-1) == data.labels).float().mean()
    assert accuracy > 0.6  # chance is 1/3


def test_our_loop_anneals_to_phis_own_strength_unless_told_otherwise():
    phi = MetaPerturbModel(MetaPerturbConfig(noise_strength=0.5))
    model = add_perturbation(create_model("conv4", num_classes=3, image_size=16), phi, input_size=(3, 16, 16))
    for asked, expected in ((None, 0.5), (1.0, 1.0), (0.25, 0.25)):
        config = TransferConfig(steps=5, batch_size=16, anneal_fraction=0.2, noise_strength=asked)
        result = train_classifier(model, separable_data(), config, progress=False)
        assert model.noise_coeff == result["noise_strength"] == expected


def test_the_plain_model_trains_in_the_same_loop():
    model = create_model("conv4", num_classes=3, image_size=16)
    result = train_classifier(model, separable_data(), TransferConfig(steps=20, batch_size=16, log_every=1),
                              progress=False)
    losses = [record["loss"] for record in result["history"]]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_trainer_callback_anneals_kappa(tmp_path):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    model = add_perturbation(ResNetForImageClassification(config), MetaPerturbModel(MetaPerturbConfig()))
    data = datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(32, 3, 32, 32).numpy(), "labels": [i % 3 for i in range(32)]}
    ).with_format("torch")
    seen = []

    class Recorder(MetaPerturbCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(_perturbed(model).noise_coeff)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8, report_to=[],
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Recorder()])
    trainer.train()
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert model.calibrate_single_pass(trainer.get_train_dataloader(), num_batches=2) == 2  # as the README says


def test_trainer_callback_anneals_to_phis_own_strength_unless_told_otherwise():
    phi = MetaPerturbModel(MetaPerturbConfig(noise_strength=0.5))
    model = add_perturbation(create_model("conv4", num_classes=3, image_size=16), phi, input_size=(3, 16, 16))
    state = type("State", (), {"global_step": 10, "max_steps": 10})()
    for callback, expected in ((MetaPerturbCallback(), 0.5), (MetaPerturbCallback(noise_strength=1.0), 1.0)):
        callback.on_step_begin(None, state, None, model=model)
        assert model.noise_coeff == expected


def _perturbed(model):
    return next(m for m in model.modules() if hasattr(m, "set_noise_coeff"))


def test_trainer_callback_refuses_an_unperturbed_model():
    with pytest.raises(ValueError, match="add_perturbation"):
        MetaPerturbCallback().on_step_begin(None, None, None, model=create_model("conv4", num_classes=3))


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="steps"):
        TransferConfig(steps=0)
    with pytest.raises(ValueError, match="anneal_fraction"):
        TransferConfig(anneal_fraction=0)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="noise_strength"):
            TransferConfig(noise_strength=strength)
        with pytest.raises(ValueError, match="noise_strength"):
            MetaPerturbCallback(noise_strength=strength)
