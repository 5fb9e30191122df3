"""The Hugging Face Hub: publishing perturbation functions with their model cards, and fetching what a loader needs.

A push builds its card in memory and uploads it in the same commit as the weights, so the local folder is never
changed, whether the push works or not. Pushes and downloads that fail raise `HubError`, which names the step or
file that failed, the repository, the endpoint and the reason (HTTP status and server message, or the connection
error). Loaders take a local folder or a repo id alike (`local_folder`, `local_file`).
"""

import hashlib
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path, PurePosixPath

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, constants, hf_hub_download

from .configuration_metaperturb import MetaPerturbConfig, check_noise_strength
from .meta_training_record import META_TRAINING_FILE, read_record
from .results import accuracy_cells, markdown_table, mean_std, paired_gains, seeds_with_gain

LIBRARY_NAME = "metaperturb-hf"
TAGS = ["metaperturb", "meta-learning", "regularization", "image-classification"]
CARD_NAME = "README.md"
WEIGHTS_NAME = "model.safetensors"
# What a released φ folder holds besides its card, by exact name (a glob would also pick up checkpoints/.../x.py).
RELEASE_FILES = ("config.json", WEIGHTS_NAME, "configuration_metaperturb.py", "modeling_metaperturb.py",
                 META_TRAINING_FILE)
PAPER = ("Ryu, Shin, Lee, Hwang: \"MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and "
         "Architectures\", NeurIPS 2020")
CITATION = """@inproceedings{ryu2020metaperturb,
  title     = {MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and Architectures},
  author    = {Ryu, Jeongun and Shin, Jaewoong and Lee, Hae Beom and Hwang, Sung Ju},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {33},
  year      = {2020}
}"""
_AUTH_HINT = " (authorisation refused: check the token in HF_TOKEN or `hf auth login`, and its write access)"

_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A MetaPerturb perturbation function φ ({{ paper }}): 82 parameters that multiply the feature maps of a
convolutional classifier (or an MLP) with learned, input-dependent noise, shared by every layer. It is meta-learned
once on a source dataset split into many tasks, then frozen and plugged into the training of other networks on other
data as a regularizer. Library: `metaperturb-hf`.

{{ weights }}

## Meta-training

{{ facts }}

## Usage

```python
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments
from metaperturb_hf import MetaPerturbModel, add_perturbation
from metaperturb_hf.transfer import MetaPerturbCallback

phi = MetaPerturbModel.from_pretrained("{{ location }}")
model = add_perturbation(ResNetForImageClassification(ResNetConfig(num_labels=10)), phi)  # φ stays frozen
trainer = Trainer(model=model, args=TrainingArguments("out", max_steps=1000, remove_unused_columns=False),
                  train_dataset=train_dataset, callbacks=[MetaPerturbCallback()])  # anneals the noise in
trainer.train()
probabilities = model.predict_proba(pixel_values, num_samples=10)  # softmax averaged over noise samples
model.save_pretrained("resnet-metaperturb")  # classifier, φ and every site's running statistics
```
{{ strength_note }}
Without the package, `AutoModel.from_pretrained("{{ location }}", trust_remote_code=True)` loads φ with the
code files stored beside the weights.

## Results

{{ results }}

## Limitations

- φ was learned from {{ source_dataset }}{{ at_size }}; whether it helps depends on the target data, the network
  and the schedule, so compare against training without it (the tables above do).
- The noise stays on at test time: average `predict_proba` over several samples, as the paper does (100). A single
  noisy pass (`num_samples=1`) is cheaper but can be far less accurate.
- A training step with φ costs several times a plain one (the project's `benchmarks/overhead.py` measures it).
- The data φ was learned from keeps its own terms of use.{{ comparison }}

## Citation

{{ paper }}.

```bibtex
{{ citation }}
```
"""


class HubError(RuntimeError):
    """A push or download that failed; the message says which step or file, where, and why."""


def _reason(error: BaseException) -> str:
    """The HTTP status and server message of the first answer in the exception chain, else the root error."""
    chain = [error]
    while (link := chain[-1].__cause__ or chain[-1].__context__) is not None and link not in chain:
        chain.append(link)
    for link in chain:
        response = getattr(link, "response", None)
        if response is not None and getattr(response, "status_code", None):
            message = response.headers.get("X-Error-Message") or getattr(response, "reason_phrase", "")
            hint = _AUTH_HINT if response.status_code in (401, 403) else ""
            return f"the server answered HTTP {response.status_code} ({message}){hint}"
    return f"{type(chain[-1]).__name__}: {str(chain[-1]).rstrip('.')}"


# --------------------------------------------------------------------------------------------------------- the card
def _text(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(_text, value))
    return str(value).replace("|", "\\|")


def meta_training_facts(meta_training: dict) -> dict[str, str]:
    """The card's meta-training table: every entry of meta_training.json but the class lists, nested ones as a.b."""
    facts = {}
    for key, value in meta_training.items():
        if key == "tasks":
            continue
        if isinstance(value, dict):
            facts.update({f"{key}.{inner}": _text(v) for inner, v in value.items()})
        else:
            facts[key] = _text(value)
    return facts


def _facts_table(meta_training: dict) -> str:
    facts = meta_training_facts(meta_training)
    if not facts:
        return f"No meta-training record ({META_TRAINING_FILE}) came with these weights."
    return "| entry | value |\n|---|---|\n" + "\n".join(f"| `{key}` | {value} |" for key, value in facts.items())


def _gain_table(records: list[dict]) -> str:
    """MetaPerturb's MC columns minus none on the same seed: what the accuracy table's means cannot show."""
    gains = paired_gains(records, lambda record: record["method"] == "metaperturb")
    if not gains:
        return ""
    lines = ["Test accuracy minus none's on the same seed (points, mean ± std over seeds):", "",
             "| target | network | setting | MC − none | seeds with a gain |", "|---|---|---|---|---|"]
    lines += [f"| {target} | {arch} | {column} | {mean_std(values)} | {seeds_with_gain(values)} |"
              for (target, arch, column), values in sorted(gains.items())]
    return "\n".join(lines) + "\n"


def _results(results: dict[str, list[dict]], source: str | None) -> tuple[str, list[EvalResult], str]:
    """Per records file, the benchmark table's rows where φ `source` ran; its means as eval results; a tally."""
    sections, evals, wins, comparisons, single_seed = [], [], 0, 0, 0
    for label, records in (results or {}).items():
        mine = [r for r in records if source is not None and r["source"] == source]
        steps = defaultdict(set)  # the cells where this φ ran at any placement or strength
        for record in records:
            if source is not None and record["source"].split(" ")[0] == source:
                steps[(record["target"], record["arch"])].add(record["steps"])
        if not steps:
            continue
        shown = [r for r in records if (r["target"], r["arch"]) in steps  # no other φ; this one's placements
                 and (r["source"] == "-" or r["source"].split(" ")[0] == source)]  # and strengths too
        sections.append(f"From `{label}`:\n\n{markdown_table(shown)}\n{_gain_table(shown)}")
        baseline = accuracy_cells([r for r in shown if r["method"] == "none"])
        target_steps = defaultdict(list)
        for (target, _), counts in steps.items():
            target_steps[target].append(counts)
        for (target, arch, column), values in sorted(accuracy_cells(mine).items()):
            mean = statistics.mean(values)
            evals.append(EvalResult(
                task_type="image-classification",
                # The hub groups results by task and dataset only, so the network goes into the metric's name.
                task_name=f"transfer to {target}, {_text(sorted(set().union(*target_steps[target])))} steps",
                dataset_type=target, dataset_name=target, dataset_split="test", metric_type="accuracy",
                metric_name=f"{column} on {arch}, accuracy (%), "
                            + (f"mean of {len(values)} seeds" if len(values) > 1 else "one seed"),
                metric_value=round(mean, 2)))
            if column == f"metaperturb [{source}]" and (target, arch, "none") in baseline:
                comparisons += 1
                single_seed += len(values) == 1  # a one-seed mean can win by noise: the tally says how many
                wins += mean > statistics.mean(baseline[(target, arch, "none")])
    if not sections:
        return f"No transfer results recorded for this φ yet (no benchmark record has `source` `{source}`).", [], ""
    text = (f"Transfer runs whose `source` is `{source}` (also at other placements and strengths), beside the methods "
            "without a φ in the same rows; the model-index holds the means of this φ's columns.\n\n"
            + "\n".join(sections))
    comparison = (f"\n- In these records, MetaPerturb with this φ (MC evaluation) beats training without a "
                  f"regularizer in {wins} of {comparisons} settings"
                  + (f" ({single_seed} of them from a single seed)" if single_seed else "") + "."
                  if comparisons else "")
    return text, evals, comparison


def build_model_card(meta_training: dict, results: dict[str, list[dict]] | None = None, *, model_name: str,
                     location: str | None = None, source: str | None = None, weights_sha256: str | None = None,
                     obtain: str | None = None, noise_strength: float = 1.0, license: str = "apache-2.0") -> ModelCard:
    r"""
    The model card of one φ.

    Args:
        meta_training: the run's meta_training.json (its entries become the card's meta-training table).
        results: transfer records by the file they came from (see `metaperturb_hf.results`); each file gets the rows
            of its benchmark table where `source` ran, and this φ's means become model-index eval results.
        model_name: the card's title and model-index name; `location` (default: `model_name`) is what the usage
            snippet loads.
        weights_sha256: the sha256 of model.safetensors, shown so a reader can check the weights against the card.
        obtain: markdown that says how to get the weights, for a card published without them.
        noise_strength: the κ φ's config says to transfer it at; below 1 the card says so.
    """
    text, evals, comparison = _results(results, source)
    if obtain is not None:
        weights = obtain
    elif weights_sha256 is not None:
        weights = f"Weights: `{WEIGHTS_NAME}`, sha256 `{weights_sha256}`."
    else:
        weights = ""
    source_dataset = meta_training.get("source_dataset") or "the source dataset"
    # Card metadata names a dataset only by its hub id; a local path or a description stays in the body.
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", source_dataset) and not Path(source_dataset).exists()
    data = ModelCardData(library_name=LIBRARY_NAME, license=license, tags=TAGS, metrics=["accuracy"],
                         datasets=[source_dataset] if is_hub_id else None,
                         model_name=model_name if evals else None, eval_results=evals or None)
    return ModelCard.from_template(
        data, template_str=_TEMPLATE, model_name=model_name, location=location or model_name, paper=PAPER,
        weights=weights, facts=_facts_table(meta_training), results=text, source_dataset=source_dataset,
        at_size=f" at {size}×{size} pixels" if (size := meta_training.get("image_size")) else "",
        comparison=comparison, citation=CITATION, strength_note=strength_note(noise_strength))


def strength_note(noise_strength: float) -> str:
    """What the card says of a φ released below full strength (`noise_strength` in its config), which the callback
    and `TransferConfig` anneal κ to unless told otherwise."""
    check_noise_strength(noise_strength)
    if noise_strength == 1.0:
        return ""
    return (f"\nThis φ is released at κ = {noise_strength:g}: its config records "
            f"`noise_strength: {noise_strength:g}`, "
            "the strength `MetaPerturbCallback()` and `TransferConfig()` anneal its noise to unless given another "
            "(`noise_strength=1.0` for the full perturbation).\n")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_name(location: str | Path) -> str:
    """The name a φ goes by in transfer records' `source`, by which its card finds them: the folder or repository
    name without "metaperturb-" (hub_cards/metaperturb-tin-full-conv4 → tin-full-conv4), a checkpoint's without
    .pth."""
    return Path(location).name.removesuffix(".pth").removeprefix("metaperturb-")


def variant_source(source: str, placement: str = "all", noise_strength: float = 1.0) -> str:
    """The `source` of a run with φ at other sites or a weaker κ ("authors @top:6", "authors κ=0.5"): the φ's own
    name first, so its card finds the run (`_results` reads the part before the first space)."""
    return source + ("" if placement == "all" else f" @{placement}") + (
        "" if noise_strength == 1.0 else f" κ={noise_strength:g}")


def card_for_folder(folder: str | Path, model_name: str, results: dict[str, list[dict]] | None = None,
                    source: str | None = None, location: str | None = None) -> ModelCard:
    """The card of a φ saved in `folder` (save_pretrained + meta_training.json)."""
    folder = Path(folder)
    return build_model_card(read_record(folder), results, model_name=model_name, location=location, source=source,
                            weights_sha256=file_sha256(folder / WEIGHTS_NAME),
                            noise_strength=MetaPerturbConfig.from_pretrained(folder).noise_strength)


# ------------------------------------------------------------------------------------------------------------- push
def upload_files(files: dict[str, Path | bytes], repo_id: str, what: str, message: str, private: bool, token) -> str:
    """Create `repo_id` if needed and upload `files` ({path in repo: local file or bytes}) in one commit."""
    api = HfApi(token=token)
    step = "creating the repository"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        step = f"uploading {len(files)} files in one commit"
        api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                                    for name, content in files.items()], commit_message=message)
    except Exception as error:
        raise HubError(f"Pushing {what} to {repo_id} on {constants.ENDPOINT} failed while {step}: {_reason(error)}. "
                       f"Nothing local was changed.") from error
    return str(url)


def push_perturbation_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the φ written by meta-training (save_pretrained + meta_training.json) with its card, in one commit.

    The card is the folder's README.md when it has one (as hub_cards/ folders do), else built from
    meta_training.json; nothing is written to the folder. Returns the repository URL.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no saved perturbation function (config.json + {WEIGHTS_NAME}).")
    files = {name: folder / name for name in RELEASE_FILES if (folder / name).is_file()}
    readme = folder / CARD_NAME
    files[CARD_NAME] = readme if readme.is_file() else card_for_folder(folder, repo_id).content.encode()
    return upload_files(files, repo_id, str(folder), "Upload MetaPerturb perturbation function", private, token)


# --------------------------------------------------------------------------------------------------------- download
def download_repo(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """Every file of `repo_id` at one commit into the hub cache, one by one so that a failure names its file."""
    api = HfApi(token=token)
    where = f"{repo_id}@{revision or 'main'} on {constants.ENDPOINT}"
    try:
        info = api.model_info(repo_id, revision=revision)
    except Exception as error:
        raise HubError(f"Looking up {where} failed: {_reason(error)}.") from error
    names = sorted(s.rfilename for s in info.siblings if s.rfilename != ".gitattributes")
    if not names:
        raise HubError(f"{where} holds no files.")
    for name in names:
        try:
            path = hf_hub_download(repo_id, name, revision=info.sha, token=token)
        except Exception as error:
            raise HubError(f"Downloading {name} from {where} (commit {info.sha}) failed: {_reason(error)}.") from error
    return Path(path).parents[len(PurePosixPath(name).parts) - 1]


# A hub repo id: "name" or "namespace/name".
_REPO_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")


def _repo_id(path_or_repo_id: str | Path) -> str:
    """`path_or_repo_id` as a repo id, once it is known not to be a local folder."""
    if isinstance(path_or_repo_id, Path) or not _REPO_ID.fullmatch(str(path_or_repo_id)):
        raise FileNotFoundError(f"No folder {str(path_or_repo_id)!r}, and it is not a hub repo id (namespace/name).")
    return str(path_or_repo_id)


def local_folder(path_or_repo_id: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as it is; a repo id downloaded whole (`download_repo`) into the hub cache."""
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    repo_id = _repo_id(path_or_repo_id)
    try:
        return download_repo(repo_id, revision, token)
    except HubError as error:
        raise HubError(f"There is no local folder {repo_id!r}, and as a hub repo: {error}") from error


def local_file(path_or_repo_id: str | Path, filename: str, revision: str | None = None,
               token: str | None = None) -> Path:
    """One file of a local folder or of a hub repo (from the cache when it is there, as hf_hub_download does)."""
    if Path(path_or_repo_id).is_dir():
        path = Path(path_or_repo_id) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found.")
        return path
    repo_id = _repo_id(path_or_repo_id)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except Exception as error:
        raise HubError(f"There is no local folder {repo_id!r}, and downloading {filename} from {repo_id}@"
                       f"{revision or 'main'} on {constants.ENDPOINT} failed: {_reason(error)}.") from error
