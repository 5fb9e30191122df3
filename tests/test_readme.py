"""The README's usage example runs as written (with the authors' checkpoint from ../shared)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(official_checkpoint, tmp_path, monkeypatch):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    code = code.replace('"official_tin_resnet20_perturb_750.pth"', repr(str(official_checkpoint)))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["probs"].shape == (4, 10)
    assert (tmp_path / "metaperturb-tin-resnet20" / "model.safetensors").is_file()
    assert (tmp_path / "perturbed-resnet" / "perturbation_sites.json").is_file()
