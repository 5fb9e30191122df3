"""Meta-training: φ learns, tasks stay private, processes do not change the result, kills and Ctrl-C resume."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest_data import image_dataset
from safetensors.torch import load_file

from metaperturb_hf.data import ImageTensors
from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig, initial_phi
from metaperturb_hf.tasks import build_tasks

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "meta_train.py"
TINY = ["--num-groups", "2", "--arch", "conv4", "--batch-size", "8", "--image-size", "16", "--log-every", "1"]


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source")
    image_dataset(num_classes=8, per_class=20, size=16).to_parquet(str(folder / "train.parquet"))
    return folder


def tiny_tasks(num_groups=2):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (160, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return build_tasks(ImageTensors(images, torch.arange(160) % 8, [str(i) for i in range(8)]), num_groups)


def trainer(tmp_path, **overrides):
    settings = dict(architectures=["conv4"], steps=3, batch_size=8, image_size=16, checkpoint_every=0,
                    output_dir=str(tmp_path / "out"), log_every=1)
    return MetaTrainer(MetaTrainingConfig(**{**settings, **overrides}), tiny_tasks())


def run_script(args, output_dir, launcher=(), env_extra=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [*launcher, *( [sys.executable] if not launcher else []), str(SCRIPT), *TINY, *args,
               "--output-dir", str(output_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)


def phi_of(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_phi(a, b, atol=1e-5):
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4)


def test_a_few_steps_change_phi_and_log_metrics(tmp_path):
    t = trainer(tmp_path)
    before = [p.detach().clone() for p in t.phi.parameters()]
    t.train()
    assert all(not torch.equal(a, b) for a, b in zip(before, t.phi.parameters()))
    lines = [json.loads(line) for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for key in ("train_loss", "valid_accuracy", "mean_s", "mean_z", "phi_grad_norm", "task3/valid_loss"):
        assert key in lines[-1] and lines[-1][key] == lines[-1][key]  # present and not NaN
    record = json.loads((tmp_path / "out" / "meta_training.json").read_text())
    assert record["num_tasks"] == 4 and record["steps"] == 3 and record["classes_per_task"] == [4, 4, 4, 4]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_phi_gradient_ignores_the_training_loss(tmp_path):
    """θ's step must not leak into φ: φ moves only by its own optimizer, from validation gradients."""
    t = trainer(tmp_path, steps=1)
    seen = []
    original = t.phi_optimizer.step
    t.phi_optimizer.step = lambda: seen.append([p.grad.clone() for p in t.phi.parameters()]) or original()
    t.train()
    (grads,) = seen
    flat = torch.cat([g.flatten() for g in grads])
    assert flat.abs().sum() > 0 and torch.isfinite(flat).all()


def test_lookahead_and_mixed_architectures_train(tmp_path):
    first = trainer(tmp_path / "a", steps=2)
    first.train()
    look = trainer(tmp_path / "b", steps=2, lookahead=True, architectures=["conv4", "mlp"])
    assert [learner.architecture for learner in look.learners] == ["conv4", "mlp", "conv4", "mlp"]
    look.train()
    assert not torch.allclose(first.phi.scale_weight, look.phi.scale_weight)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"architectures": ["conv9000"]}, "Unknown architecture"),
        ({"batch_size": 64}, "fewer than batch_size"),
        ({"mixed_precision": "fp16"}, "bf16"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, **overrides)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--image-column", "pixels"], "pixels"),
        (["--label-column", "image"], "label"),
        (["--num-groups", "9"], "groups"),
        (["--batch-size", "64"], "batch|smaller"),
    ],
)
def test_bad_input_to_the_script_is_a_clear_error(parquet_dir, tmp_path, args, match):
    spec = importlib.util.spec_from_file_location("meta_train_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [*TINY, "--dataset", str(parquet_dir), "--steps", "1", *args, "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=match):
        script.main(argv)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_one_and_two_processes_give_the_same_phi_and_private_classifiers(parquet_dir, tmp_path):
    common = ["--dataset", str(parquet_dir), "--steps", "3", "--checkpoint-every", "3"]
    single = run_script(common, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29631"]
    double = run_script(common, tmp_path / "two", launcher=launcher, env_extra={"ACCELERATE_USE_CPU": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    assert "over 2 process(es)" in double.stdout + double.stderr
    assert_same_phi(phi_of(tmp_path / "one"), phi_of(tmp_path / "two"))
    for task_id in range(4):  # each classifier trained alone: identical wherever it ran, never averaged
        a = torch.load(tmp_path / "one" / "checkpoints" / "checkpoint-3" / f"task-{task_id}.pt", weights_only=True)
        b = torch.load(tmp_path / "two" / "checkpoints" / "checkpoint-3" / f"task-{task_id}.pt", weights_only=True)
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-4, rtol=1e-4)
    first = torch.load(tmp_path / "one" / "checkpoints" / "checkpoint-3" / "task-0.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "one" / "checkpoints" / "checkpoint-3" / "task-2.pt", weights_only=True)["model"]
    assert not torch.allclose(first["model.features.0.0.weight"], second["model.features.0.0.weight"])


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_killed_run_resumes_to_the_same_phi(parquet_dir, tmp_path):
    common = ["--dataset", str(parquet_dir), "--steps", "8", "--checkpoint-every", "2"]
    reference = run_script(common, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *TINY, *common, "--output-dir", str(tmp_path / "killed")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "killed" / "checkpoints" / "checkpoint-4", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = run_script([*common, "--resume"], tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert_same_phi(phi_of(tmp_path / "reference"), phi_of(tmp_path / "killed"), atol=1e-6)
    logged = [[json.loads(line)["step"]
               for line in (tmp_path / run / "logs" / "metrics.jsonl").read_text().splitlines()]
              for run in ("reference", "killed")]
    assert logged[1] == logged[0] == list(range(1, 9))  # what the killed run logged past checkpoint-4 is not repeated
    record = (tmp_path / "killed" / "meta_training.json").read_text()
    again = run_script([*common, "--resume"], tmp_path / "killed")  # a finished run resumed: nothing is rewritten
    assert again.returncode == 0 and "Already finished at step 8" in again.stdout + again.stderr
    assert (tmp_path / "killed" / "meta_training.json").read_text() == record


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(parquet_dir, tmp_path):
    common = ["--dataset", str(parquet_dir), "--steps", "400", "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *TINY, *common, "--output-dir", str(tmp_path / "out")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "out" / "logs" / "metrics.jsonl", process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "rerun with --resume" in out + err
    (checkpoint,) = list((tmp_path / "out" / "checkpoints").glob("checkpoint-*"))
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 400 and (checkpoint / "perturbation" / "model.safetensors").is_file()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; mixed precision can only be chosen on a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_phi(tmp_path, fresh_accelerator_state):
    t = trainer(tmp_path, steps=2, mixed_precision="bf16")
    assert t.accelerator.mixed_precision == "bf16"
    before = t.phi.scale_weight.detach().clone()
    t.train()
    assert t.phi.scale_weight.dtype == torch.float32  # φ and its optimizer stay in full precision
    assert torch.isfinite(t.phi.scale_weight).all() and not torch.equal(before, t.phi.scale_weight)


def test_logs_phi_magnitudes_gradients_and_per_site_noise(tmp_path):
    t = trainer(tmp_path, steps=2)
    t.train()
    line = json.loads((tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    for group in ("lambda1", "lambda2", "gamma1", "gamma2", "K", "w"):
        assert line[f"phi/mean_abs_{group}"] > 0 and line[f"phi/grad_norm_{group}"] >= 0
        assert 0 <= line[f"phi/adam_step_{group}"] <= 1.01
        assert -1 <= line[f"phi/grad_cos_{group}"] <= 1
    assert line["phi/mean_abs_K"] == pytest.approx(float(t.phi.stat_kernels.detach().abs().mean()))
    per_site = [line[f"site{i}/mean_z"] for i in range(4)]  # conv4: four sites
    assert all(z > 0 for z in per_site) and "site4/mean_z" not in line
    assert "task0/site0/mean_z" not in line  # per-site values are logged across tasks only


def test_phi_statistics_cut_the_gradient_into_phis_groups():
    from metaperturb_hf.meta_training import phi_statistics

    phi = initial_phi(MetaTrainingConfig(architectures=["conv4"]))
    flat = torch.cat([p.detach().flatten() for p in phi.parameters()])
    stats = phi_statistics(phi, 2 * flat)  # a gradient along the parameters: every cosine is 1
    assert all(stats[f"phi/grad_cos_{g}"] == pytest.approx(1)
               for g in ("lambda1", "lambda2", "gamma1", "gamma2", "K", "w"))
    assert stats["phi/grad_norm_lambda2"] == pytest.approx(2 * float(phi.identity_kernels[1].detach().norm()))
    assert stats["phi/mean_abs_gamma1"] == pytest.approx(float(phi.mean_kernels[0].detach().abs().mean()))


def test_phi_adam_steps_tell_a_consistent_gradient_from_one_that_flips_sign():
    from metaperturb_hf.meta_training import phi_adam_steps

    phi = initial_phi(MetaTrainingConfig(architectures=["conv4"]))
    optimizer = torch.optim.Adam(phi.parameters(), lr=1e-3)
    assert phi_adam_steps(optimizer.state_dict(), phi) == {}  # no step yet
    for step in range(40):
        for parameter in phi.parameters():
            parameter.grad = torch.ones_like(parameter)
        phi.identity_kernels.grad = torch.full_like(phi.identity_kernels, (-1.0) ** step)  # λ: sign flips every step
        optimizer.step()
    steps = phi_adam_steps(optimizer.state_dict(), phi)
    assert all(steps[f"phi/adam_step_{g}"] == pytest.approx(1, abs=1e-3) for g in ("gamma1", "gamma2", "K", "w"))
    assert steps["phi/adam_step_lambda1"] < 0.1 and steps["phi/adam_step_lambda2"] < 0.1


def test_phi_initial_value_averaged_over_draws_shrinks_by_its_square_root():
    one = initial_phi(MetaTrainingConfig(architectures=["conv4"], phi_init_std=0.1))
    averaged = initial_phi(MetaTrainingConfig(architectures=["conv4"], phi_init_std=0.1, phi_init_average=16))
    std_one = torch.cat([p.flatten() for p in one.parameters()]).std()
    std_averaged = torch.cat([p.flatten() for p in averaged.parameters()]).std()
    assert 0.07 < std_one < 0.13
    assert 2.5 < std_one / std_averaged < 6  # sqrt(16) = 4 up to sampling noise over 82 numbers


def test_meta_training_starts_from_a_given_phi(tmp_path):
    given = initial_phi(MetaTrainingConfig(architectures=["conv4"], phi_init_std=0.2, seed=7))
    given.save_pretrained(tmp_path / "given")
    t = trainer(tmp_path, steps=1, phi_init_from=str(tmp_path / "given"))
    for started, expected in zip(t.phi.parameters(), given.parameters()):
        torch.testing.assert_close(started, expected)
    t.train()
    assert not torch.equal(t.phi.scale_weight, given.scale_weight)  # it trains from there
    assert (json.loads((tmp_path / "out" / "meta_training.json").read_text())["phi_init_from"]
            == str(tmp_path / "given"))


@pytest.mark.parametrize(("mode", "optimizer"), [("l2", torch.optim.Adam), ("decoupled", torch.optim.AdamW)])
def test_phi_weight_decay_options(tmp_path, mode, optimizer):
    t = trainer(tmp_path, steps=3, phi_weight_decay=0.01, phi_weight_decay_mode=mode, phi_weight_decay_start=2)
    assert type(t.phi_optimizer) is optimizer
    assert t.phi_optimizer.param_groups[0]["weight_decay"] == 0.0
    seen = []
    original = t.phi_optimizer.step
    t.phi_optimizer.step = lambda: seen.append(t.phi_optimizer.param_groups[0]["weight_decay"]) or original()
    t.train()
    assert seen == [0.0, 0.01, 0.01]
    record = json.loads((tmp_path / "out" / "meta_training.json").read_text())
    assert record["phi_weight_decay_mode"] == mode and record["phi_weight_decay_start"] == 2


def test_phi_options_are_validated():
    with pytest.raises(ValueError, match="phi_weight_decay_mode"):
        MetaTrainingConfig(architectures=["conv4"], phi_weight_decay_mode="adamw")
    with pytest.raises(ValueError, match="phi_init_average"):
        MetaTrainingConfig(architectures=["conv4"], phi_init_average=0)
    with pytest.raises(ValueError, match="phi_init_from starts from a given φ"):
        MetaTrainingConfig(architectures=["conv4"], phi_init_from="phi-folder", phi_init_std=0.1)
