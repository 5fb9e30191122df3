"""benchmarks/structured_phi.py: γ₁, λ₂ and γ₂ at the gain on every tap, the rest as meta-training draws
it."""

import pytest
import torch
from script_loading import load_script

from metaperturb_hf import load_perturbation
from metaperturb_hf.meta_training import MetaTrainingConfig, initial_phi

structured_phi = load_script("benchmarks/structured_phi.py")


def test_structured_phi_sets_the_mean_kernels_and_the_second_identity_kernel(tmp_path):
    structured_phi.main(["--gain", "0.03", "--seed", "2", "--output", str(tmp_path / "phi")])
    phi, drawn = load_perturbation(tmp_path / "phi"), initial_phi(MetaTrainingConfig(seed=2))
    assert torch.all(phi.mean_kernels == 0.03) and torch.all(phi.identity_kernels[1] == 0.03)
    for name in ("stat_kernels", "scale_weight"):
        torch.testing.assert_close(getattr(phi, name), getattr(drawn, name), rtol=0, atol=0)
    torch.testing.assert_close(phi.identity_kernels[0], drawn.identity_kernels[0], rtol=0, atol=0)
    with pytest.raises(SystemExit):
        structured_phi.main(["--gain", "-1", "--output", str(tmp_path / "bad")])
