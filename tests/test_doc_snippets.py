"""Every YAML snippet of a project config in the Markdown docs validates against its schema.

The docs are README.md, the other Markdown files at the repository root, and docs/**/*.md. Each
fenced code block (``` or ~~~, indented ones inside list items too) whose text is a YAML mapping
is classified by its top-level keys:

- a **sweep spec** (`sweeps.spec_schema.SweepSpec`) when it has a key that only a sweep spec has
  (`storage`, `space`, `search`, `pruner`, `resources`, `eval`, ...). Every key it holds is then
  checked as a sweep spec key: a key of another schema in it (e.g. `output:`) is reported;
- a **training config** (`python -m trainer --config`: TrainConfig fields plus `output:`) when it
  has a key only that has, and no prompt-suite key;
- a **prompt suite** (`evaluator.suites`) when it has a key only a suite has (`natural`, ...);
- keys that both a sweep spec and a training config have (`base_model`, `dataset`,
  `trigger_word`) alone: checked as both.

```yaml / ```yml and untagged blocks are read so. A block tagged with another language (bash,
text, json, ...) is the author's word that it is something else: it is read only when it is wholly
a sweep spec (a sweep-spec key, and no key that a sweep spec lacks). Anything else (shell lines,
cluster-launcher YAML, prose) is not a project config and is left out; a ```yaml block must still
parse as YAML.

A snippet with every required key is validated as it stands (a relative `eval.suite` is relative
to the Markdown file, as a spec's is to its file). A fragment is merged over a minimal valid base
(the required keys of examples/demo.yaml or examples/train.yaml), mappings key by key, and the
result is validated, so a fragment is judged on its own keys against the schema's defaults.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from evaluator.suites import PromptSuite, SuiteError, parse_suite
from sweeps.spec import SpecError, parse_spec
from sweeps.spec_schema import SweepSpec
from trainer.__main__ import ConfigProblems, read_run_config
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md"))

SWEEP_KEYS = set(SweepSpec.model_fields)
TRAIN_KEYS = set(TrainConfig.model_fields) | {"output", "caption"}  # trainer/__main__.read_run_config's layout
SUITE_KEYS = set(PromptSuite.model_fields)
SWEEP_ONLY = SWEEP_KEYS - TRAIN_KEYS - SUITE_KEYS
TRAIN_ONLY = TRAIN_KEYS - SWEEP_KEYS - SUITE_KEYS
SUITE_ONLY = SUITE_KEYS - SWEEP_KEYS - TRAIN_KEYS
SHARED = SWEEP_KEYS & TRAIN_KEYS  # base_model, dataset, trigger_word

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_CLOSE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*$")


@dataclass(frozen=True)
class Block:
    source: str  # "docs/cluster.md:44": the file and the line of the opening fence
    lang: str  # the fence's info word, lower case; "" when untagged
    text: str
    closed: bool = True
    folder: Path = ROOT  # what a relative path in the block is relative to


def fenced_blocks(markdown: str, name: str, folder: Path = ROOT) -> list[Block]:
    """Fenced code blocks in document order; an indented fence's indentation is removed."""
    lines, blocks, i = markdown.splitlines(), [], 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"].expandtabs(4))
        lang = (m["info"].split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines):
            close = _CLOSE.match(lines[j])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence):
                break
            line = lines[j].expandtabs(4)
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            j += 1
        blocks.append(Block(f"{name}:{i + 1}", lang, "\n".join(body) + "\n", closed=j < len(lines), folder=folder))
        i = j + 1
    return blocks


def doc_blocks() -> list[Block]:
    out = []
    for path in DOC_FILES:
        out += fenced_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), path.parent)
    return out


def classify(data: object) -> str | None:
    """`sweep`, `train`, `suite`, `shared`, `mixed` (a training config's and a suite's keys), or None."""
    if not isinstance(data, dict) or not data:
        return None
    keys = set(data)
    if keys & SWEEP_ONLY:
        return "sweep"
    train, suite = keys & TRAIN_ONLY, keys & SUITE_ONLY
    if train and suite:
        return "mixed"
    if train:
        return "train"
    if suite:
        return "suite"
    if keys <= SHARED:
        return "shared"
    return None


def load_block(block: Block) -> object:
    """The block's YAML, or None when it is not YAML (a ```yaml block must be: it raises)."""
    try:
        return yaml.safe_load(block.text)
    except yaml.YAMLError:
        if block.lang in ("yaml", "yml"):
            raise
        return None


YAML_LANGS = ("yaml", "yml", "")


def block_kind(block: Block) -> str | None:
    """The block's kind (see `classify`) when it is to be validated, else None."""
    try:
        data = load_block(block)
    except yaml.YAMLError:
        return None  # reported by test_yaml_blocks_parse
    kind = classify(data)
    if block.lang in YAML_LANGS:
        return kind
    return kind if kind == "sweep" and set(data) <= SWEEP_KEYS else None


def config_snippets() -> list[Block]:
    return [b for b in doc_blocks() if block_kind(b) is not None]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _sweep_base() -> dict:
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    required = [k for k, f in SweepSpec.model_fields.items() if f.is_required()]
    base = {k: demo[k] for k in required}
    base["trigger_word"] = demo["trigger_word"]  # the demo suite's prompts use {trigger}
    base["eval"] = {"suite": str((ROOT / "examples" / demo["eval"]["suite"]).resolve())}  # as load_spec does
    return base


def _train_base() -> dict:
    train = yaml.safe_load((ROOT / "examples" / "train.yaml").read_text())
    return {k: train[k] for k, f in TrainConfig.model_fields.items() if f.is_required()}


def _is_full(data: dict, model) -> bool:
    return all(k in data for k, f in model.model_fields.items() if f.is_required())


def sweep_problems(data: dict, source: str, folder: Path = ROOT) -> list[str]:
    if _is_full(data, SweepSpec):
        data = copy.deepcopy(data)
        suite = data["eval"].get("suite") if isinstance(data.get("eval"), dict) else None
        if isinstance(suite, str) and not Path(suite).expanduser().is_absolute():
            data["eval"]["suite"] = str((folder / suite).resolve())
    else:
        base = _sweep_base()
        if isinstance(data.get("eval"), dict) and ({"suite", "prompts"} & set(data["eval"])):
            del base["eval"]["suite"]  # the fragment says what is scored on
        data = _merge(base, data)
    try:
        spec = parse_spec(data, source)
        assert spec.eval_prompts()[0], "no eval prompts"
    except SpecError as err:
        return err.problems
    return []


def train_problems(data: dict, source: str) -> list[str]:
    if not _is_full(data, TrainConfig):
        data = _merge(_train_base(), data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.yaml"
        path.write_text(yaml.safe_dump(data))
        try:
            read_run_config(str(path), [], None, None)
        except ConfigProblems as err:
            return err.problems
    return []


def suite_problems(data: dict, source: str) -> list[str]:
    try:
        parse_suite(data, source)
    except SuiteError as err:
        return str(err).splitlines()
    return []


def snippet_problems(block: Block) -> list[str]:
    """Why the block is not a valid config of its kind (empty: it is, or it is no config at all)."""
    kind, data = block_kind(block), load_block(block)
    if kind == "sweep":
        return sweep_problems(data, block.source, block.folder)
    if kind == "train":
        return train_problems(data, block.source)
    if kind == "suite":
        return suite_problems(data, block.source)
    if kind == "shared":
        return sweep_problems(data, block.source, block.folder) + train_problems(data, block.source)
    if kind == "mixed":
        train, suite = sorted(set(data) & TRAIN_ONLY), sorted(set(data) & SUITE_ONLY)
        return [f"(top level): mixes training-config keys {train} and prompt-suite keys {suite}"]
    return []


# --- the docs ---------------------------------------------------------------------------------

ALL_BLOCKS = doc_blocks()
SNIPPETS = config_snippets()


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda b: b.source)
def test_doc_snippet_validates(block):
    problems = snippet_problems(block)
    assert not problems, f"{block.source}: the snippet does not validate:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in ("yaml", "yml")], ids=lambda b: b.source)
def test_yaml_blocks_parse(block):
    yaml.safe_load(block.text)


def test_every_fence_is_closed():
    assert not [b.source for b in ALL_BLOCKS if not b.closed]


def test_the_known_snippets_are_found():
    """The extractor sees the docs' sweep-spec snippets (so an empty parametrization cannot pass)."""
    kinds = {b.source.split(":")[0]: block_kind(b) for b in SNIPPETS}
    assert kinds.get("README.md") == "sweep"  # the `space:` example
    assert kinds.get("docs/cluster.md") == "sweep"  # the cluster's storage / dataset / resources
    cluster = [b for b in SNIPPETS if b.source.startswith("docs/cluster.md")]
    assert any("storage" in load_block(b) for b in cluster)


# --- the checker itself -----------------------------------------------------------------------


def _one(markdown: str) -> Block:
    blocks = [b for b in fenced_blocks(markdown, "doc.md") if block_kind(b)]
    assert len(blocks) == 1, blocks
    return blocks[0]


OLD_CLUSTER_SNIPPET = """\
Three things differ from a local sweep:

```yaml
output: s3://YOUR-BUCKET/sweeps            # on-prem: /mnt/lorasweep/sweeps (the NFS mount)
dataset: /home/ubuntu/data/train           # the path the dataset is mounted at on every node
resources: {cpus_per_trial: 3, gpus_per_trial: 1}
```
"""


def test_checker_reports_the_output_key():
    """docs/cluster.md once said `output:` where the schema says `storage:`; this checker catches it."""
    block = _one(OLD_CLUSTER_SNIPPET)
    assert (block.source, block_kind(block)) == ("doc.md:3", "sweep")
    problems = snippet_problems(block)
    assert problems == ["output: unknown key; remove it or check its spelling"], problems
    fixed = _one(OLD_CLUSTER_SNIPPET.replace("output: s3", "storage: s3"))
    assert snippet_problems(fixed) == []


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("space:\n  rank: {type: choice, values: [0, 4]}\n", "space.rank"),
        ("space:\n  learning_rate: {type: loguniform, low: 0, high: 1.0e-3}\n", "space.learning_rate.low"),
        ("search: {sampler: tpe, num_trail: 4}\n", "search.num_trail: unknown key"),
        ("pruner: {type: medain}\n", "pruner.type"),
        ("eval: {interval: 10, suite: {natural: ['a photo of {trigger} {klass}']}}\n", "eval.suite"),
        ("learning_rate: 1.0e-4\nspace: {}\n", "learning_rate: unknown key"),  # a TrainConfig key at a spec's top
    ],
    ids=["bad-choice", "bad-log-low", "misspelled-nested", "bad-literal", "bad-inline-suite", "train-key-in-spec"],
)
def test_checker_reports_bad_sweep_fragments(snippet, expected):
    block = _one(f"```yaml\n{snippet}```\n")
    problems = snippet_problems(block)
    assert any(p.startswith(expected) for p in problems), problems


def test_checker_validates_full_specs_as_they_stand():
    demo = (ROOT / "examples" / "demo.yaml").read_text()
    full = Block("doc.md:1", "yaml", demo, folder=ROOT / "examples")  # suite relative to examples/
    assert snippet_problems(full) == []
    # Relative to the Markdown file: from the repository root, suites/demo.yaml does not exist.
    assert any(p.startswith("eval.suite") for p in snippet_problems(Block("doc.md:1", "yaml", demo, folder=ROOT)))
    unknown = Block("doc.md:1", "yaml", demo + "output: runs\n", folder=ROOT / "examples")
    assert snippet_problems(unknown) == ["output: unknown key; remove it or check its spelling"]


def _problems(body: str, lang: str = "yaml") -> list[str]:
    return snippet_problems(_one(f"```{lang}\n{body}```\n"))


def test_checker_reports_bad_training_configs_and_suites():
    assert _problems("learning_rate: 1.0e-4\nrank: 8\n") == []
    assert any(p.startswith("rank") for p in _problems("rank: 0\nlearning_rate: 1.0e-4\n"))
    assert any(p.startswith("lr_schedular") for p in _problems("learning_rate: 1.0e-4\nlr_schedular: cosine\n", lang=""))
    assert any(p.startswith("output.format") for p in _problems("output: {format: safetensors}\n"))
    assert _problems("natural: ['a photo of {trigger} {class}']\n") == []
    assert _problems("no_concept: ['a photo of {trigger}']\n")  # a suite's no-concept prompt with the trigger
    assert _problems("rank: 4\nnatural: ['a photo of {trigger}']\n")  # a training config's and a suite's keys


def test_extractor_finds_indented_tilde_and_untagged_fences_and_skips_the_rest():
    markdown = """\
- a list item:

  ```yaml
  space:
    rank: {type: choice, values: [0]}
  ```

~~~~
storage: runs
~~~~

```bash
python sweeps/run.py --space search.yaml
```

```yaml
cluster_name: lorasweep
provider: {type: aws}
```

```text
dataset: a word in prose
```

```json
{"space": {"rank": {"type": "choice", "values": [0]}}}
```
"""
    blocks = fenced_blocks(markdown, "doc.md")
    assert [(b.source, b.lang) for b in blocks] == [
        ("doc.md:3", "yaml"), ("doc.md:8", ""), ("doc.md:12", "bash"), ("doc.md:16", "yaml"), ("doc.md:21", "text"),
        ("doc.md:25", "json"),
    ]
    assert blocks[0].text.startswith("space:\n  rank:")
    assert [block_kind(b) for b in blocks] == ["sweep", "sweep", None, None, None, "sweep"]
    assert any(p.startswith("space.rank") for p in snippet_problems(blocks[0]))
    assert any(p.startswith("space.rank") for p in snippet_problems(blocks[5]))
    assert snippet_problems(blocks[1]) == []
    assert snippet_problems(blocks[2]) == snippet_problems(blocks[3]) == snippet_problems(blocks[4]) == []
    assert not all(b.closed for b in fenced_blocks("```yaml\nstorage: runs\n", "doc.md"))
    with pytest.raises(yaml.YAMLError):
        load_block(Block("doc.md:1", "yaml", "space: [unclosed\n"))
