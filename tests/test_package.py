"""The package namespace: submodules are attributes of `metaperturb_hf`, loaded on first use."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_FRESH_IMPORT = r'''
import json, sys
import metaperturb_hf as mp
out = {"loaded_by_import": sorted(name for name in ("metaperturb_hf.architectures", "metaperturb_hf.meta_training",
                                                    "metaperturb_hf.data", "datasets") if name in sys.modules)}
out["model"] = type(mp.architectures.create_model("conv4", 3)).__name__
out["trainer"] = mp.meta_training.MetaTrainer.__name__
out["listed"] = {"architectures", "evaluation", "transfer", "hub"} <= set(dir(mp))
try:
    mp.no_such_module
except AttributeError as error:
    out["missing"] = str(error)
print(json.dumps(out))
'''


def test_submodules_are_reached_from_the_package_and_loaded_only_when_used():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["loaded_by_import"] == []  # `import metaperturb_hf` does not pay for them
    assert (out["model"], out["trainer"], out["listed"]) == ("ConvNet", "MetaTrainer", True)
    assert out["missing"] == "module 'metaperturb_hf' has no attribute 'no_such_module'"
