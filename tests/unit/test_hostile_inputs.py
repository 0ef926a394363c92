"""Hostile and careless inputs (issue 17): each class is refused as one AquinError naming the file.

PEFT adapters, prompt files, SAEs and output files. Checkpoint formats (sparse,
quantized and meta tensors, absurd values, zip bombs, the unpickling allow-list,
bridge state dicts) are covered in test_checkpoints.py.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aquin_nb import AquinError
from aquin_nb.catalog import EMBEDDED_DIR

# --- PEFT adapters -----------------------------------------------------------------

LORA_A = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
LORA_B = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


def save_adapter(model, directory: Path) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter on c_attn (random A and B) for ``model``; the state PEFT merges."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(directory)
    return peft_model.merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_hf):
    """A saved LoRA adapter (see `save_adapter`) and the model PEFT merges from it."""
    directory = tmp_path_factory.mktemp("adapter") / "lora"
    return directory, save_adapter(tiny_hf[0], directory)


def _variant(tmp_path: Path, adapter_dir: Path, config=None, config_text=None, tensors=None):
    """A copy of the adapter with its config changed, replaced, or its tensors edited."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "variant"
    shutil.copytree(adapter_dir, directory)
    config_path = directory / "adapter_config.json"
    if config is not None:
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **config}))
    if config_text is not None:
        config_path.write_text(config_text)
    if tensors is not None:
        weights = directory / "adapter_model.safetensors"
        save_file(tensors(load_file(weights)), weights)
    return directory


def _apply(tiny_hf, directory):
    from aquin_nb.models import apply_checkpoint

    return apply_checkpoint(copy.deepcopy(tiny_hf[0]), directory)


def test_a_valid_adapter_merges_exactly_as_peft_does(tiny_hf, adapter):
    directory, merged = adapter
    loaded = _apply(tiny_hf, directory).state_dict()
    assert all(torch.equal(loaded[key], merged[key]) for key in merged)
    base = tiny_hf[0].state_dict()
    assert not torch.equal(
        loaded["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"]
    )


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_adapter_bin_holding_a_malicious_pickle_is_refused_and_never_runs(
    tmp_path, tiny_hf, adapter
):
    directory = _variant(tmp_path, adapter[0])
    (directory / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(directory / "adapter_model.bin", "wb") as handle:
        pickle.dump({LORA_A: _Exploit(marker)}, handle, protocol=2)
    with pytest.raises(AquinError, match=r"adapter_model\.bin: it would import posix\.system"):
        _apply(tiny_hf, directory)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("config", "text", "message"),
    [
        ({"r": "abc"}, None, r"r is 'abc', expected an integer rank"),
        ({"r": 0}, None, r"r is 0, expected an integer rank"),
        ({"r": 10**9}, None, r"r is 1000000000, expected an integer rank from 1 to 192"),
        ({"target_modules": 5}, None, r"target_modules is 5, expected a module name list"),
        ({"lora_alpha": "x"}, None, r"lora_alpha is 'x', expected a finite number"),
        ({"rank_pattern": {"c_attn": "big"}}, None, r"rank_pattern is .*expected an object"),
        (None, "[1, 2]", r"holds a JSON array, expected an object"),
        (None, "{", r"is not valid JSON"),
        (None, "[" * 100_000, r"nested too deeply"),
        (None, '{"r": ' + "7" * 5000 + "}", r"is not usable JSON: Exceeds the limit"),
        ({"peft_type": "NOT_A_METHOD"}, None, r"peft_type is 'NOT_A_METHOD'"),
    ],
)
def test_bad_adapter_config_is_refused_naming_the_file(
    tmp_path, tiny_hf, adapter, config, text, message
):
    directory = _variant(tmp_path, adapter[0], config=config, config_text=text)
    with pytest.raises(AquinError, match=rf"adapter_config\.json.*{message}"):
        _apply(tiny_hf, directory)


def _with(key, value_of):
    def edit(tensors):
        tensors[key] = value_of(tensors[key])
        return tensors

    return edit


def _adding(key, value):
    def edit(tensors):
        tensors[key] = value
        return tensors

    return edit


def _without(key):
    def edit(tensors):
        del tensors[key]
        return tensors

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _with(LORA_B, lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
            rf"tensor {LORA_B} in PEFT adapter .*adapter_model\.safetensors holds NaN or inf",
        ),
        (_with(LORA_B, lambda t: t.fill_(float("inf"))), "holds NaN or inf"),
        (_with(LORA_B, lambda t: t.fill_(1e30)), "magnitude 1e\\+30"),
        (_without(LORA_A), rf"1 tensor\(s\) missing \(first: {LORA_A}\)"),
        (
            _adding("base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight", torch.zeros(4, 192)),
            r"1 unexpected tensor\(s\) \(first: .*mlp\.c_fc\.lora_A\.weight\)",
        ),
        (
            _with(LORA_A, lambda t: t[:2]),
            rf"tensor {LORA_A} has shape \(2, 192\) in PEFT adapter .* implies \(4, 192\)",
        ),
        (_with(LORA_A, lambda t: t.to(torch.float64)), None),  # a dtype change alone is fine
    ],
    ids=[
        "nan_lora_B",
        "inf_lora_B",
        "huge_lora_B",
        "missing_lora_A",
        "unexpected",
        "shape",
        "float64",
    ],
)
def test_adapter_tensors_get_the_checks_plain_checkpoints_get(
    tmp_path, tiny_hf, adapter, edit, message
):
    directory = _variant(tmp_path, adapter[0], tensors=edit)
    if message is None:
        _apply(tiny_hf, directory)
        return
    with pytest.raises(AquinError, match=message):
        _apply(tiny_hf, directory)


def test_a_refused_adapter_leaves_the_model_as_it_was(tmp_path, tiny_hf, adapter):
    from aquin_nb.models import apply_checkpoint

    directory = _variant(tmp_path, adapter[0], tensors=_without(LORA_A))
    model = copy.deepcopy(tiny_hf[0])
    with pytest.raises(AquinError, match="missing"):
        apply_checkpoint(model, directory)
    assert not any("lora" in name for name, _ in model.named_modules())
    base = tiny_hf[0].state_dict()
    assert all(torch.equal(value, base[key]) for key, value in model.state_dict().items())


def test_an_alpha_that_makes_the_merged_weights_explode_is_refused(tmp_path, tiny_hf, adapter):
    directory = _variant(tmp_path, adapter[0], config={"lora_alpha": 1e30})
    with pytest.raises(
        AquinError, match=r"transformer\.h\.0\.attn\.c_attn \(merged\) in PEFT adapter .*magnitude"
    ):
        _apply(tiny_hf, directory)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", "(.|.)*Q"),
        ("target_modules", "(a+)+c_attn"),
        ("target_modules", ".*.*.*.*.*.*c_attn"),
        ("exclude_modules", "(x|x)*y"),
        ("rank_pattern", {"(c+)+_attn": 4}),
        ("modules_to_save", ["(a|a)*b"]),
        ("target_modules", "(?P<x>h)(?P=x)"),
    ],
)
def test_adapter_regexes_that_could_backtrack_for_minutes_are_refused(
    tmp_path, tiny_hf, adapter, field, value
):
    directory = _variant(tmp_path, adapter[0], config={field: value})
    with pytest.raises(
        AquinError,
        match=rf"adapter_config\.json: {field} .* is refused because Python's regex matcher could",
    ):
        _apply(tiny_hf, directory)


def test_an_ordinary_target_regex_is_accepted(tmp_path, tiny_hf, adapter):
    directory, merged = adapter
    loaded = _apply(
        tiny_hf, _variant(tmp_path, directory, config={"target_modules": r".*\.attn\.(c_attn)"})
    ).state_dict()
    assert all(torch.equal(loaded[key], merged[key]) for key in merged)


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], r"model\.layers\.\d+\.self_attn\.q_proj"]
)
def test_adapter_whose_targets_are_not_in_the_model_is_refused(tmp_path, tiny_hf, adapter, targets):
    directory = _variant(tmp_path, adapter[0], config={"target_modules": targets})
    with pytest.raises(
        AquinError,
        match=r"adapter_config\.json: target_modules .* match no module of the model .*c_attn",
    ):
        _apply(tiny_hf, directory)


def test_regex_path_bound_known_answers():
    from aquin_nb._adapters import regex_path_bound

    assert regex_path_bound("c_attn", 40) == 1
    assert regex_path_bound(r".*\.c_attn", 40) == 41
    assert regex_path_bound(r".*(q|k)_proj.*", 10) == 11 * 11  # (q|k) compiles to a class
    assert regex_path_bound(r".*(q_proj|k_proj)", 10) == 11 * 2
    with pytest.raises(ValueError, match="repeats a group"):
        regex_path_bound("(.|.)*Q", 40)


# --- prompt files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("deep.json", "[" * 100_000, r"deep\.json is not usable JSON: it is nested too deeply"),
        (
            "deep.jsonl",
            '{"a": ' * 100_000 + "\n",
            r"deep\.jsonl line 1 is not usable JSON: it is nested too deeply",
        ),
        (
            "digits.json",
            "[" + "9" * 5000 + "]",
            r"digits\.json is not usable JSON: Exceeds the limit .* digits",
        ),
        (
            "digits.jsonl",
            '"ok"\n' + "9" * 5000 + "\n",
            r"digits\.jsonl line 2 is not usable JSON: Exceeds the limit",
        ),
    ],
)
def test_hostile_prompt_json_is_refused_naming_the_file(tmp_path, name, text, message):
    from aquin_nb.probes import load_prompts

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AquinError, match=message):
        load_prompts(path)


class _RecordingTokenizer:
    """Wraps a tokenizer and records the longest text it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.longest = 0
        self.bos_token_id = inner.bos_token_id
        self.eos_token_id = inner.eos_token_id

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.inner(texts, **kwargs)


def test_a_huge_one_line_prompt_is_cut_before_tokenising(tiny_hf):
    from aquin_nb._activations import CHARS_PER_TOKEN, tokenize_prompts

    tokenizer = _RecordingTokenizer(tiny_hf[1])
    words = " ".join(f"word{index % 97}" for index in range(400_000))  # ~3 MB, one line
    ids = tokenize_prompts(tokenizer, [words, "short prompt"], prepend_bos=True, max_length=128)
    assert tokenizer.longest == 128 * CHARS_PER_TOKEN
    full = tiny_hf[1](words[:20_000], add_special_tokens=False)["input_ids"]
    assert ids[0] == [tokenizer.bos_token_id, *full[:127]]
    assert ids[1] == [
        tokenizer.bos_token_id,
        *tiny_hf[1]("short prompt", add_special_tokens=False)["input_ids"],
    ]


class _SparseTokenizer:
    """One token per 100 characters: the first cut yields too few tokens and must grow."""

    bos_token_id = 0
    eos_token_id = 0

    def __call__(self, texts, **kwargs):
        return {
            "input_ids": [
                [1 + len(text[:i]) % 7 for i in range(0, len(text), 100)] for text in texts
            ]
        }


def test_a_cut_that_yields_too_few_tokens_grows_until_it_has_them():
    from aquin_nb._activations import encode_prefixes

    text = "x" * 1_000_000
    ids = encode_prefixes(_SparseTokenizer(), [text], max_length=64)
    assert len(ids[0]) >= 64
    assert ids[0][:64] == _SparseTokenizer()([text])["input_ids"][0][:64]


def _encode_rows_whole(tokenizer, rows, max_length):
    """encode_rows as it was before it cut texts: every text tokenised whole."""
    from aquin_nb.probes import format_row

    encoded = []
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][:max_length]
            encoded.append((ids, list(ids)))
            continue
        prompt = format_row(row["instruction"], "", tokenizer) + " "
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = format_row(row["instruction"], row["response"], tokenizer)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
        encoded.append((ids, labels))
    return encoded


def test_a_huge_one_line_training_row_is_cut_before_tokenising(tiny_hf):
    from aquin_nb._activations import CHARS_PER_TOKEN
    from aquin_nb._rows import encode_rows

    tokenizer = _RecordingTokenizer(tiny_hf[1])
    words = " ".join(f"word{index % 97}" for index in range(400_000))  # ~3 MB, one line
    short = [
        {"text": "a short row"},
        {"instruction": "Add two numbers.", "response": "Use +."},
    ]
    huge = [
        {"text": words},
        {"instruction": words, "response": "ok"},  # the loss would start past the cut
        {"instruction": "Repeat the words.", "response": words},
        *short,
    ]
    encoded = encode_rows(tokenizer, huge, max_length=128)
    assert tokenizer.longest == 128 * CHARS_PER_TOKEN
    # The first 128 tokens of 20,000 characters are those of the whole 3 MB text.
    prefix = [
        {key: value[:20_000] if value is words else value for key, value in row.items()}
        for row in huge
    ]
    assert encoded == _encode_rows_whole(tiny_hf[1], prefix, 128)
    assert [len(ids) for ids, _ in encoded[:3]] == [128, 128, 128]
    assert set(encoded[1][1]) == {-100}  # all instruction: no response token in reach
    assert 0 < encoded[2][1].count(-100) < 128
    # Rows shorter than the cut are encoded exactly as before, EOS included.
    assert encode_rows(tiny_hf[1], short, 128) == _encode_rows_whole(tiny_hf[1], short, 128)
    assert encode_rows(tiny_hf[1], short, 128)[1][0][-1] == tiny_hf[1].eos_token_id


# --- SAEs --------------------------------------------------------------------------

SAE_DIR = EMBEDDED_DIR / "tiny-gpt2-res" / "blocks.2.hook_resid_pre"


def _sae_variant(tmp_path: Path, cfg=None, cfg_text=None, tensors=None) -> Path:
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "sae"
    shutil.copytree(SAE_DIR, directory)
    cfg_path = directory / "cfg.json"
    if cfg is not None:
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **cfg}))
    if cfg_text is not None:
        cfg_path.write_text(cfg_text)
    if tensors is not None:
        weights = directory / "sae_weights.safetensors"
        save_file(tensors(load_file(weights)), weights)
    return directory


def test_the_embedded_sae_copy_loads(tmp_path):
    from aquin_nb import load_sae

    assert load_sae(_sae_variant(tmp_path)).cfg.d_sae == 1536


@pytest.mark.parametrize(
    ("cfg", "text", "message"),
    [
        ({"d_sae": 0}, None, r"cfg\.json: d_sae is 0, expected an integer"),
        ({"d_sae": -5}, None, r"cfg\.json: d_sae is -5, expected an integer"),
        ({"d_sae": 10**12}, None, r"cfg\.json: d_sae is 1000000000000, expected an integer"),
        ({"d_in": "abc"}, None, r"cfg\.json: d_in is 'abc', expected an integer"),
        (
            {"d_sae": 1024},
            None,
            r"W_dec has shape \(1536, 192\) in .*sae_weights\.safetensors but cfg",
        ),
        ({"metadata": [1]}, None, r"cfg\.json: metadata is a list"),
        (None, "[1, 2]", r"cfg\.json holds a JSON array, expected an object"),
        (None, "[" * 100_000, r"cfg\.json is not usable JSON: it is nested too deeply"),
    ],
)
def test_bad_sae_cfg_is_refused_naming_the_file(tmp_path, cfg, text, message):
    from aquin_nb import load_sae

    with pytest.raises(AquinError, match=message):
        load_sae(_sae_variant(tmp_path, cfg=cfg, cfg_text=text))


@pytest.mark.parametrize("key", ["W_enc", "b_dec"])
def test_sae_with_nan_weights_is_refused_naming_the_tensor(tmp_path, key):
    from aquin_nb import load_sae

    def poison(tensors):
        tensors[key].view(-1)[5] = float("nan")
        return tensors

    with pytest.raises(
        AquinError, match=rf"tensor {key} in SAE .*sae_weights\.safetensors holds NaN"
    ):
        load_sae(_sae_variant(tmp_path, tensors=poison))


def _sae_pt(tmp_path: Path, cfg_changes=None, state_edit=None, cfg=None) -> Path:
    from safetensors.torch import load_file

    base_cfg = json.loads((SAE_DIR / "cfg.json").read_text())
    state = load_file(SAE_DIR / "sae_weights.safetensors")
    if state_edit is not None:
        state_edit(state)
    payload = {
        "cfg": cfg if cfg is not None else {**base_cfg, **(cfg_changes or {})},
        "state_dict": state,
    }
    path = tmp_path / "sae.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    ("changes", "cfg", "message"),
    [
        ({"d_sae": 10**12}, None, r"sae\.pt cfg: d_sae is 1000000000000"),
        (
            {"d_sae": 3000},
            None,
            r"W_dec has shape \(1536, 192\) in .*sae\.pt but cfg d_in=192, d_sae=3000",
        ),
        ({"d_in": "abc"}, None, r"sae\.pt cfg: d_in is 'abc'"),
        (None, [["d_in", 192]], r"SAE file .*sae\.pt must hold"),
    ],
)
def test_bad_sae_pt_is_refused_before_anything_is_allocated(tmp_path, changes, cfg, message):
    from aquin_nb import load_sae

    with pytest.raises(AquinError, match=message):
        load_sae(_sae_pt(tmp_path, cfg_changes=changes, cfg=cfg))


def test_sae_pt_with_nan_is_refused(tmp_path):
    from aquin_nb import load_sae

    def poison(state):
        state["W_enc"][0, 0] = float("nan")

    with pytest.raises(AquinError, match=r"tensor W_enc in SAE .*sae\.pt holds NaN"):
        load_sae(_sae_pt(tmp_path, state_edit=poison))


# --- output files ------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it (tests run in one thread)."""
    previous = os.umask(0o022)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path, umask, mask):
    from aquin_nb._io import atomic_torch_save, atomic_write_json, atomic_write_text, current_umask

    umask(mask)
    assert current_umask() == mask
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~mask
    for path in (
        atomic_write_json(tmp_path / "r.json", {"a": 1}),
        atomic_write_text(tmp_path / "r.html", "<p>"),
        atomic_torch_save(tmp_path / "c.pt", {"w": torch.zeros(1)}),
    ):
        assert path.stat().st_mode & 0o777 == expected, path


def test_replacing_a_file_keeps_its_mode_as_open_would(tmp_path, umask):
    from aquin_nb._io import atomic_write_json

    umask(0o022)
    path = tmp_path / "private.json"
    path.write_text("{}")
    path.chmod(0o600)
    atomic_write_json(path, {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o600


_KILLED_WRITER = """
import os, signal, sys
from aquin_nb._io import atomic_write

def write(handle):
    handle.write(b"half a report")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write)
"""


def test_temp_file_of_a_writer_killed_mid_write_is_removed_on_the_next_write(tmp_path):
    from aquin_nb._io import atomic_write_json

    target = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], check=False)
    assert done.returncode == -9
    leftovers = list(tmp_path.glob(".report.json.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()
    # Give it the age a leftover has by the time anyone writes here again.
    old = time.time() - 120
    os.utime(leftovers[0], (old, old))
    atomic_write_json(tmp_path / "other.json", {"a": 1})
    assert list(tmp_path.glob(".*.tmp")) == []


def test_a_directory_is_swept_once_per_interval_not_on_every_write(tmp_path):
    from aquin_nb._io import atomic_write_json

    atomic_write_json(tmp_path / "shard_0.json", [0])
    stale = tmp_path / ".shard_1.json.999999999.abc123.tmp"
    stale.write_text("x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    atomic_write_json(tmp_path / "shard_2.json", [2])
    assert stale.exists()  # the sweep ran with the first write; the next comes later


def test_only_stale_temp_files_of_our_own_pattern_are_removed(tmp_path):
    from aquin_nb._io import remove_stale_temp_files

    now = time.time()

    def make(name: str, age: float) -> Path:
        path = tmp_path / name
        path.write_text("x")
        os.utime(path, (now - age, now - age))
        return path

    live_fresh = make(f".a.json.{os.getpid()}.abc123.tmp", 5)
    live_idle = make(f".b.json.{os.getpid()}.abc123.tmp", 7200)
    dead_fresh = make(".c.json.999999999.abc123.tmp", 5)
    dead_idle = make(".d.json.999999999.abc123.tmp", 120)
    not_ours = [
        make(".e.json.tmp", 7200),
        make("f.999999999.abc.tmp", 7200),
        make(".g.json.x1.tmp", 7200),
    ]
    removed = remove_stale_temp_files(tmp_path, now=now)
    assert sorted(removed) == sorted([live_idle, dead_idle])
    assert all(path.exists() for path in [live_fresh, dead_fresh, *not_ours])


def test_writing_onto_a_directory_is_an_aquin_error(tmp_path):
    from aquin_nb._io import atomic_write_json

    (tmp_path / "out").mkdir()
    with pytest.raises(AquinError, match=r"cannot write .*out: it is a directory"):
        atomic_write_json(tmp_path / "out", {"a": 1})


def test_output_that_is_an_input_is_refused(tmp_path):
    from aquin_nb._io import check_not_same_file

    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"x")
    os.link(checkpoint, tmp_path / "hard.pt")
    (tmp_path / "soft.pt").symlink_to(checkpoint)
    for output in (
        checkpoint,
        tmp_path / "hard.pt",
        tmp_path / "soft.pt",
        tmp_path / "." / "ckpt.pt",
    ):
        with pytest.raises(AquinError, match=r"output .* is the input .*ckpt\.pt"):
            check_not_same_file(output, "prompts.json", checkpoint)
    check_not_same_file(tmp_path / "report.json", checkpoint, None)
    with pytest.raises(AquinError, match="is a directory"):
        check_not_same_file(tmp_path, checkpoint)
