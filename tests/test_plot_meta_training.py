"""benchmarks/plot_meta_training.py: the median gradient norm per group and window of logged steps, and φ's group
sizes at given steps."""

import json

import pytest
from script_loading import load_script

plot_meta_training = load_script("benchmarks/plot_meta_training.py")


def test_gradient_medians_take_each_window_half_open_and_ignore_a_spike():
    groups = plot_meta_training.PHI_GROUPS
    norms = {0: 1.0, 5: 100.0, 10: 3.0, 15: 0.01, 20: 0.02, 25: 0.03}  # a spike at step 5
    rows = [{"step": step, **{f"phi/grad_norm_{group}": norm for group in groups}} for step, norm in norms.items()]
    early, late = plot_meta_training.gradient_medians(rows, [0, 15, 30])
    assert early["steps"] == [0, 15] and early["lambda1"] == 3.0  # median of 1, 100, 3: the spike does not decide
    assert late["steps"] == [15, 30] and late["w"] == 0.02  # step 15 belongs to the second window only


def _row(step, noise_generator, z_per_site):
    magnitudes = dict(zip(plot_meta_training.PHI_GROUPS, (*noise_generator, 0.5, 0.25)))
    return {"step": step, "valid_accuracy": 0.1,
            **{f"phi/mean_abs_{group}": value for group, value in magnitudes.items()},
            **{f"site{site}/mean_z": z for site, z in enumerate(z_per_site)}}


def test_sizes_average_the_noise_generator_only_and_span_the_sites():
    rows = [_row(5, (0.01, 0.02, 0.03, 0.06), (0.81, 0.84, 0.90)), _row(10, (0.0, 0.0, 0.0, 0.0), (0.806, 0.806))]
    early, late = plot_meta_training.sizes_at(rows, [5, 10])
    assert early["noise_generator"] == pytest.approx(0.03)  # K and w (0.5, 0.25) stay out of it
    assert (early["lambda2"], early["gamma2"], early["K"], early["w"]) == (0.02, 0.06, 0.5, 0.25)
    assert early["site_z"] == [0.81, 0.90] and late["site_z"] == [0.806, 0.806]


def test_sizes_name_unlogged_steps():
    with pytest.raises(SystemExit, match=r"Steps \[7\] are not logged"):
        plot_meta_training.sizes_at([_row(5, (0, 0, 0, 0), (0.8,))], [5, 7])


def test_overlay_series_skip_rows_without_phi_statistics_and_take_the_highest_z(tmp_path, monkeypatch):
    rows = [{"step": 1, "valid_accuracy": 0.1}, _row(5, (0.01, 0.02, 0.03, 0.06), (0.81, 0.84, 0.90)),
            _row(10, (0.0, 0.0, 0.0, 0.0), (0.806, 0.806))]
    steps, sizes, highest_z = plot_meta_training.noise_generator_series(rows)
    assert steps == [5, 10] and sizes == pytest.approx([0.03, 0.0]) and highest_z == [0.90, 0.806]
    plotted, series = [], plot_meta_training.noise_generator_series

    def recording_series(rows):
        result = series(rows)
        plotted.append(result[0])
        return result

    monkeypatch.setattr(plot_meta_training, "noise_generator_series", recording_series)
    plot_meta_training.main([str(_write(tmp_path / "a.jsonl", rows)), "--overlay", "--max-step", "5",
                             "--output", str(tmp_path / "o.png")])
    assert plotted == [[5]]  # step 10 is past --max-step
    assert (tmp_path / "o.png").stat().st_size > 0


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
