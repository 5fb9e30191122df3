"""benchmarks/plot_meta_training.py: the median gradient norm per group and window of logged steps."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_meta_training", ROOT / "benchmarks" / "plot_meta_training.py")
plot_meta_training = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_meta_training)


def test_gradient_medians_take_each_window_half_open_and_ignore_a_spike():
    groups = plot_meta_training.PHI_GROUPS
    norms = {0: 1.0, 5: 100.0, 10: 3.0, 15: 0.01, 20: 0.02, 25: 0.03}  # a spike at step 5
    rows = [{"step": step, **{f"phi/grad_norm_{group}": norm for group in groups}} for step, norm in norms.items()]
    early, late = plot_meta_training.gradient_medians(rows, [0, 15, 30])
    assert early["steps"] == [0, 15] and early["lambda1"] == 3.0  # median of 1, 100, 3: the spike does not decide
    assert late["steps"] == [15, 30] and late["w"] == 0.02  # step 15 belongs to the second window only
