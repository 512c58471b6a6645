"""Property-based fuzzing of everything edgetune reads from a user: data files (JSONL in every
format, .txt), manifests, safetensors files, PEFT adapters and device profiles.

Random bytes, truncation, wrong types, huge numbers, deep nesting, invalid UTF-8 and lone
surrogates. The only outcome allowed besides success is edgetune's own error, in one line.
``derandomize=True`` makes every CI run try the same examples.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import TALLY

from edgetune.errors import EdgetuneError


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def only_edgetune_errors(target: str, fn, *args, **kwargs):
    """Run ``fn``; success or a one-line EdgetuneError pass, anything else fails the example."""
    TALLY[f"fuzz:{target}"] += 1
    try:
        return fn(*args, **kwargs)
    except EdgetuneError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "Traceback" not in msg, msg
        TALLY[f"fuzz-refused:{target}"] += 1
        return None


# ----------------------------------------------------------------------------- strategies

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**200)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                    max_leaves=12)
TEXT = st.text(max_size=60) | st.sampled_from(["", " ", "\n\n", "<|im_end|>", "<|im_start|>assistant\n", "\x00",
                                                "{{ raise }}", "{% endfor %}", "\u202e", "🙂" * 5])
STR_OR_JUNK = TEXT | JSON

ROLE = st.sampled_from(["system", "user", "assistant"]) | JSON
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": STR_OR_JUNK}) | JSON
RECORD = st.one_of(
    st.fixed_dictionaries({"text": STR_OR_JUNK}),
    st.fixed_dictionaries({"instruction": STR_OR_JUNK, "output": STR_OR_JUNK}, optional={"input": STR_OR_JUNK}),
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=5) | JSON}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}), min_size=1, max_size=5)}),
    JSON,
)
# Raw fragments that JSON values cannot express: spliced into the file bytes.
NASTY = st.sampled_from([
    b"\\ud800", b'"\\udfff"', b"\\u0000", b"9" * 5000, b"-" + b"1" * 4301, b"[" * 3000, b"{" * 3000,
    b'{"a":' * 2000, b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"\r", b"\n", b"\r\n",
    b"NaN", b"-Infinity", b"1e999999", b'"', b"\\", b",", b"}", b"]", b"\x1b[31m", b"\t",
])


@st.composite
def mutated(draw, base: bytes):
    """``base`` after a few random edits: truncation, splices of nasty fragments, byte flips, deletions."""
    data = bytearray(base)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["truncate", "splice", "flip", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[pos:]
        elif op == "splice":
            data[pos:pos] = draw(NASTY)
        elif op == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


VALID_RECORD = st.one_of(
    st.fixed_dictionaries({"text": TEXT}),
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT | st.none()}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}), min_size=1, max_size=4)}),
)


@st.composite
def jsonl_file(draw) -> bytes:
    lines = []
    records = VALID_RECORD if draw(st.booleans()) else RECORD  # half the files are well-formed before mutation
    for rec in draw(st.lists(records, min_size=0, max_size=6)):
        try:
            lines.append(json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass"))
        except ValueError:  # a float json cannot write
            lines.append(b"{}")
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    return draw(mutated(newline.join(lines) + draw(st.sampled_from([b"", newline]))))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_tokenizer):
    """The tiny tokenizer without a chat template (the other code path of Alpaca and chat records)."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    return tok


# ----------------------------------------------------------------------------- data loaders


@fuzz(500)
@given(content=jsonl_file(), seq_len=st.integers(2, 48), pack=st.booleans(), template=st.booleans(),
       max_records=st.none() | st.integers(0, 4))
def test_fuzz_jsonl_loader(scratch, tiny_tokenizer, plain_tokenizer, content, seq_len, pack, template, max_records):
    from edgetune.training.data import build_dataset

    path = scratch / "data.jsonl"
    path.write_bytes(content)
    ds = only_edgetune_errors("JSONL data loader (build_dataset)", build_dataset, path,
                              tiny_tokenizer if template else plain_tokenizer, seq_len, pack=pack,
                              max_records=max_records)
    if ds is not None:
        assert ds.input_ids.shape == ds.labels.shape == ds.attention_mask.shape and ds.seq_len == seq_len
        assert len(ds) >= 1 and ds.n_target_tokens >= 1


@fuzz(300)
@given(content=st.binary(max_size=400) | st.text(max_size=300).map(lambda t: t.encode("utf-8")),
       seq_len=st.integers(2, 48), suffix=st.sampled_from([".jsonl", ".json", ""]))
def test_fuzz_jsonl_loader_random_bytes(scratch, tiny_tokenizer, content, seq_len, suffix):
    from edgetune.training.data import build_dataset

    path = scratch / f"bytes{suffix}"
    path.write_bytes(content)
    only_edgetune_errors("JSONL data loader, random bytes", build_dataset, path, tiny_tokenizer, seq_len)


@fuzz(300)
@given(content=st.binary(max_size=400) | st.text(max_size=400).map(lambda t: t.encode("utf-8")).flatmap(mutated),
       seq_len=st.integers(2, 48), pack=st.booleans())
def test_fuzz_text_loader(scratch, tiny_tokenizer, content, seq_len, pack):
    from edgetune.training.data import build_dataset

    path = scratch / "data.txt"
    path.write_bytes(content)
    only_edgetune_errors("text data loader (.txt)", build_dataset, path, tiny_tokenizer, seq_len, pack=pack)


# ----------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def manifest_dir(scratch) -> Path:
    from edgetune.manifest import write_manifest

    d = scratch / "artifact"
    (d / "tokenizer").mkdir(parents=True)
    for name in ("config.json", "base.safetensors", "trainable.safetensors", "tokenizer/vocab.json"):
        (d / name).write_bytes(name.encode() * 3)
    write_manifest(d, "compiled", {"recipe": "lora"})
    return d


PATHS = st.sampled_from(["config.json", "base.safetensors", "trainable.safetensors", "tokenizer/vocab.json",
                         "tokenizer", "missing.bin", "../x", "/etc/passwd", "a/../../b", "C:\\x", "\x00",
                         "manifest.json", "tokenizer/../config.json"]) | st.text(max_size=30)
KINDS = st.sampled_from(["compiled", "run", "adapter", "checkpoint", None])


@fuzz(400)
@given(data=st.data())
def test_fuzz_manifest_reader(manifest_dir, data):
    from edgetune.manifest import MANIFEST, artifact_kind, read_manifest

    original = (manifest_dir / MANIFEST).read_bytes()
    shape = data.draw(st.sampled_from(["bytes", "mutated", "structured"]))
    if shape == "bytes":
        content = data.draw(st.binary(max_size=300))
    elif shape == "mutated":
        content = data.draw(mutated(original))
    else:
        valid = json.loads(original)
        files = data.draw(st.dictionaries(PATHS, st.sampled_from(list(valid["files"].values())) | JSON, max_size=5)
                          | st.just(valid["files"]) | JSON)
        obj = {"format": data.draw(st.sampled_from(["edgetune.compiled", "edgetune.run", "compiled"]) | JSON),
               "files": files}
        if data.draw(st.booleans()):
            obj = {**valid, **obj}
        content = json.dumps(obj).encode()
    try:
        (manifest_dir / MANIFEST).write_bytes(content)
        only_edgetune_errors("manifest reader (read_manifest)", read_manifest, manifest_dir, data.draw(KINDS),
                             verify=data.draw(st.booleans()))
        only_edgetune_errors("manifest kind (artifact_kind)", artifact_kind, manifest_dir)
    finally:
        (manifest_dir / MANIFEST).write_bytes(original)


# ----------------------------------------------------------------------------- safetensors and PEFT adapters


@pytest.fixture(scope="module")
def peft_dir(scratch) -> Path:
    from edgetune.exporters.peft import export_peft

    d = scratch / "peft"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    adapters = {f"model.layers.{i}.self_attn.{p}": (torch.randn(8, 16, generator=g), torch.randn(12, 8, generator=g))
                for i in range(2) for p in ("q_proj", "v_proj")}
    export_peft(d, adapters, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"],
                base_model_name_or_path="tiny")
    return d


@st.composite
def safetensors_bytes(draw, base: bytes) -> bytes:
    """A real file mutated, random bytes, or a real body under a random (often lying) header."""
    how = draw(st.sampled_from(["mutated", "bytes", "header"]))
    if how == "mutated":
        return draw(mutated(base))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    (n,) = struct.unpack("<Q", base[:8])
    header, body = json.loads(base[8:8 + n]), base[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]))
        value = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X"]) if field == "dtype"
                     else st.lists(st.integers(-2, 2**64), max_size=3) | JSON)
        if field == "entry" or not isinstance(header[name], dict):
            header[name] = value
        else:
            header[name][field] = value
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | JSON, max_size=2))
    raw = json.dumps(header).encode()
    length = draw(st.just(len(raw)) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else \
        struct.pack("<Q", length) + raw + body


@fuzz(300)
@given(data=st.data())
def test_fuzz_safetensors_loader(scratch, peft_dir, data):
    from edgetune.tensors import load_tensors

    base = (peft_dir / "adapter_model.safetensors").read_bytes()
    path = scratch / "fuzz.safetensors"
    path.write_bytes(data.draw(safetensors_bytes(base)))
    out = only_edgetune_errors("safetensors loader (load_tensors)", load_tensors, path)
    if out is not None:
        assert all(torch.is_tensor(t) for t in out.values())


CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "fan_in_fan_out", "bias"]


@fuzz(300)
@given(data=st.data())
def test_fuzz_peft_reader(scratch, peft_dir, data):
    from edgetune.exporters.peft import CONFIG_NAME, WEIGHTS_NAME, read_peft

    d = scratch / "peft-fuzz"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(peft_dir, d)
    cfg_bytes = (d / CONFIG_NAME).read_bytes()
    what = data.draw(st.sampled_from(["config", "weights", "both"]))
    if what in ("config", "both"):
        how = data.draw(st.sampled_from(["mutated", "fields", "bytes"]))
        if how == "mutated":
            cfg_bytes = data.draw(mutated(cfg_bytes))
        elif how == "fields":
            cfg = json.loads(cfg_bytes)
            for key in data.draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=3)):
                if data.draw(st.booleans()):
                    cfg.pop(key, None)
                else:
                    cfg[key] = data.draw(JSON)
            cfg_bytes = json.dumps(cfg).encode()
        else:
            cfg_bytes = data.draw(st.binary(max_size=200))
        (d / CONFIG_NAME).write_bytes(cfg_bytes)
    if what in ("weights", "both"):
        (d / WEIGHTS_NAME).write_bytes(data.draw(safetensors_bytes((d / WEIGHTS_NAME).read_bytes())))
    out = only_edgetune_errors("PEFT adapter reader (read_peft)", read_peft, d)
    if out is not None:
        config, adapters = out
        assert isinstance(config, dict) and all(len(pair) == 2 for pair in adapters.values())


# ----------------------------------------------------------------------------- device profiles


@pytest.fixture(scope="module")
def valid_profile() -> dict:
    from edgetune.profiles import builtin_profiles

    return builtin_profiles()["jetson-orin-nano-8gb"].to_dict()


PROFILE_VALUES = (JSON | st.floats() | st.integers(-10**30, 10**30) | st.sampled_from(
    [0, -1, 1e6, 1e300, float("nan"), float("inf"), "", "cuda", "cpu", "tpu", ["float32"], [], ["float64"],
     "float16", True]))


@fuzz(400)
@given(data=st.data())
def test_fuzz_profile_parser(valid_profile, data):
    from edgetune.profiles import parse_profile

    profile = dict(valid_profile)
    for _ in range(data.draw(st.integers(0, 4))):
        key = data.draw(st.sampled_from(sorted(profile) + ["extra", ""]) | st.text(max_size=8))
        if data.draw(st.integers(0, 4)) == 0:
            profile.pop(key, None)
        else:
            profile[key] = data.draw(PROFILE_VALUES)
    obj = profile if data.draw(st.integers(0, 9)) else data.draw(JSON)
    only_edgetune_errors("device-profile parser (parse_profile)", parse_profile, obj, "fuzz.toml")


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, list) else "[" + ", ".join(json.dumps(x) for x in v) + "]"


@fuzz(300)
@given(data=st.data())
def test_fuzz_profile_files(scratch, valid_profile, data):
    from edgetune.profiles import load_profile

    toml = "".join(f"{k} = {_toml_value(v)}\n" for k, v in valid_profile.items()).encode()
    how = data.draw(st.sampled_from(["mutated", "bytes", "deep", "name"]))
    path = scratch / "profile.toml"
    if how == "name":  # the --device argument itself
        arg = data.draw(st.text(max_size=50) | st.sampled_from(["a" * 5000, "a" * 5000 + ".toml", "\x00", "/",
                                                                  ".", "..", "x.toml", str(scratch)]))
        only_edgetune_errors("device-profile loader (load_profile)", load_profile, arg)
        return
    if how == "mutated":
        content = data.draw(mutated(toml))
    elif how == "bytes":
        content = data.draw(st.binary(max_size=300))
    else:
        depth = data.draw(st.integers(1, 5000))
        content = toml + b"deep = " + data.draw(st.sampled_from([b"[", b"{x="])) * depth + b"\n"
    path.write_bytes(content)
    only_edgetune_errors("device-profile loader (load_profile)", load_profile, str(path))


# ----------------------------------------------------------------------------- the CLI: exit 2, one line


def _cli(argv) -> tuple[int, str]:
    from edgetune.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _assert_cli_outcome(target: str, code: int, err: str) -> None:
    TALLY[f"fuzz:{target}"] += 1
    assert "Traceback" not in err, err
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("edgetune: error:")]
        assert code == 2 and len(errors) == 1, (code, err)
        TALLY[f"fuzz-refused:{target}"] += 1


@fuzz(40)
@given(data=st.data())
def test_fuzz_cli_device_profile(scratch, valid_profile, tiny_hf_dir, data):
    toml = "".join(f"{k} = {_toml_value(v)}\n" for k, v in valid_profile.items()).encode()
    path = scratch / "cli-profile.toml"
    path.write_bytes(data.draw(mutated(toml) | st.binary(max_size=100)))
    out = scratch / "cli-compiled"
    shutil.rmtree(out, ignore_errors=True)
    code, err = _cli(["compile", tiny_hf_dir, "--recipe", "lora", "--device", path, "--out", out])
    _assert_cli_outcome("CLI compile --device <fuzzed TOML>", code, err)


@fuzz(15)
@given(content=jsonl_file())
def test_fuzz_cli_train_data(scratch, compiled_dropout, content):
    path = scratch / "cli-data.jsonl"
    path.write_bytes(content)
    code, err = _cli(["train", compiled_dropout, "--data", path, "--out", scratch / "cli-run", "--overwrite",
                      "--steps", "1", "--batch", "1", "--seq-len", "8", "--save-every", "0",
                      "--save-interval-s", "0"])
    _assert_cli_outcome("CLI train --data <fuzzed JSONL>", code, err)


@fuzz(10)
@given(data=st.data())
def test_fuzz_cli_adapter(scratch, peft_dir, tiny_hf_dir, data):
    """A foreign PEFT adapter (no edgetune manifest) with a fuzzed config applied to the base."""
    from edgetune.exporters.peft import CONFIG_NAME

    d = scratch / "cli-peft"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(peft_dir, d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    for key in data.draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=3)):
        if data.draw(st.booleans()):
            cfg.pop(key, None)
        else:
            cfg[key] = data.draw(JSON | st.sampled_from([0, 8, 16, -8, 10**12, 1e308, "q_proj", ["q_proj"], []]))
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    code, err = _cli(["generate", tiny_hf_dir, "--adapter", d, "--prompt", "hi", "--max-new-tokens", "1"])
    _assert_cli_outcome("CLI generate --adapter <fuzzed PEFT config>", code, err)


def test_entry_point_on_a_hostile_profile_exits_2_without_traceback(tmp_path, tiny_hf_dir):
    """The real process: exit code 2 and one line, for an input the fuzzing found crashing before."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "deep.toml"
    bad.write_text("name = 'x'\ndeep = " + "[" * 5000 + "\n")
    proc = subprocess.run([sys.executable, "-m", "edgetune", "compile", str(tiny_hf_dir), "--device", str(bad),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert str(bad) in proc.stderr and "invalid TOML" in proc.stderr
    assert not (tmp_path / "o").exists()
    TALLY["fuzz:CLI subprocess on a hostile file"] += 1
