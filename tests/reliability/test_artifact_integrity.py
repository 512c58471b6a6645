"""Artifacts that cannot be silently corrupted: every file hashed, every load verified, manifest
paths confined to their directory, lying safetensors headers refused, outputs never overwritten
without --overwrite, adapters tied to their base, and no pickle anywhere.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from reliability_helpers import error_line, run_cli

from edgetune.errors import ArtifactError, EdgetuneError
from edgetune.manifest import MANIFEST, read_manifest, write_manifest
from edgetune.tensors import load_tensors, save_tensors

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ["edgetune", "exporters", "quant", "devices"]  # pyproject maps these into the edgetune package


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        path.write_bytes(bytes(b))
    elif how == "emptied":
        path.write_bytes(b"")
    else:  # "appended"
        path.write_bytes(data + b"\x00")


HOW = ("truncated", "flipped", "emptied", "appended")


def assert_refused(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert isinstance(exc, EdgetuneError) and "\n" not in msg
    for n in needles:
        assert n in msg, msg


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, reference_run):
    from edgetune import api

    return api.export_adapter(reference_run, tmp_path_factory.mktemp("adapter") / "peft")


# ----------------------------------------------------------------------------- every file of every artifact


def test_every_file_of_a_compiled_artifact_is_verified(tmp_path, compiled_dropout, tally):
    from edgetune.api import load_compiled

    listed = json.loads((compiled_dropout / MANIFEST).read_text())["files"]
    assert {"config.json", "base.safetensors", "trainable.safetensors"} <= set(listed)
    assert any(name.startswith("tokenizer/") for name in listed)
    n = 0
    for name in listed:
        for how in HOW:
            copy = tmp_path / f"c{n}"
            shutil.copytree(compiled_dropout, copy)
            damage(copy / name, how)
            with pytest.raises(ArtifactError) as exc:
                load_compiled(copy)
            assert_refused(exc.value, str(copy / name), "checksum mismatch")
            n += 1
            shutil.rmtree(copy)
    tally["faults:compiled-artifact file damaged (truncated, flipped, emptied, appended)"] += n
    tally["refused:corrupt compiled-artifact files"] += n


def test_every_file_of_a_run_and_an_adapter_is_verified(tmp_path, reference_run, adapter_dir, tally):
    from edgetune.api import attach_adapter, load_run

    n = 0
    for name in json.loads((reference_run / MANIFEST).read_text())["files"]:
        if not (name.startswith("checkpoints/step-00000011/") or "/" not in name):
            continue  # the other checkpoint is checked the same way
        copy = tmp_path / f"r{n}"
        shutil.copytree(reference_run, copy)
        damage(copy / name, "flipped")
        with pytest.raises(ArtifactError) as exc:
            load_run(copy)
        assert_refused(exc.value, str(copy / name), "checksum mismatch")
        n += 1
    tally["faults:run file damaged"] += n
    tally["refused:corrupt run files"] += n
    model, _, _ = load_run(reference_run)
    m = 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        for how in HOW:
            copy = tmp_path / f"a{m}"
            shutil.copytree(adapter_dir, copy)
            damage(copy / name, how)
            with pytest.raises(ArtifactError) as exc:
                attach_adapter(model, copy)
            assert_refused(exc.value, str(copy / name))
            m += 1
    tally["faults:adapter file damaged"] += m
    tally["refused:corrupt adapter files"] += m


def test_cli_refuses_a_corrupt_artifact_in_one_line(capsys, tmp_path, reference_run, adapter_dir, tiny_hf_dir,
                                                    train_text, tally):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    damage(run / "trainable.safetensors", "truncated")
    code, _, err = run_cli(capsys, ["export", run, "--out", tmp_path / "x"])
    assert code == 2 and "trainable.safetensors" in error_line(err) and "checksum mismatch" in error_line(err)
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    damage(adapter / "adapter_model.safetensors", "flipped")
    code, _, err = run_cli(capsys, ["eval", tiny_hf_dir, "--adapter", adapter, "--data", train_text,
                                    "--seq-len", "32"])
    assert code == 2 and "adapter_model.safetensors" in error_line(err)
    tally["refused:corrupt artifacts refused by the CLI"] += 2


def test_dropping_a_file_from_the_manifest_does_not_skip_its_check(tmp_path, compiled_dropout, tally):
    from edgetune.api import load_compiled

    copy = tmp_path / "c"
    shutil.copytree(compiled_dropout, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"]["base.safetensors"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as exc:
        load_compiled(copy)
    assert_refused(exc.value, "base.safetensors is not listed")
    tally["refused:manifest with a loaded file left out"] += 1


# ----------------------------------------------------------------------------- manifest paths


@pytest.fixture
def small_artifact(tmp_path):
    d = tmp_path / "art"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "c.txt").write_text("c")
    write_manifest(d, "thing", {})
    return d


def _with_entry(d: Path, rel, digest=None) -> None:
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["files"][rel] = digest or hashlib.sha256(b"secret").hexdigest()
    (d / MANIFEST).write_text(json.dumps(manifest))


BAD_PATHS = ["../outside.txt", "/etc/passwd", "sub/../../outside.txt", "sub/../a.txt", "./a.txt", "sub//b.txt",
             "C:\\Windows\\win.ini", "..\\outside.txt", "a.txt\0.png", "", "sub/", "//server/share"]


@pytest.mark.parametrize("rel", BAD_PATHS)
def test_manifest_paths_cannot_leave_their_directory(small_artifact, rel, tally):
    assert read_manifest(small_artifact)["files"].keys() == {"a.txt", "sub/b.txt"}
    _with_entry(small_artifact, rel)
    with pytest.raises(ArtifactError) as exc:
        read_manifest(small_artifact)
    assert_refused(exc.value, "manifest")
    tally["refused:manifest entries pointing outside (.., absolute, drive, NUL, ...)"] += 1


@pytest.mark.parametrize("link", ["file-out", "file-in", "dir-out"])
def test_manifest_never_follows_a_symlink(small_artifact, link, tally):
    d = small_artifact
    if link == "file-out":
        (d / "link.txt").symlink_to(d.parent / "outside.txt")
        rel = "link.txt"
    elif link == "file-in":
        (d / "link.txt").symlink_to(d / "a.txt")
        rel = "link.txt"
    else:
        (d / "linkdir").symlink_to(d.parent / "outside-dir", target_is_directory=True)
        rel = "linkdir/c.txt"
    assert rel not in write_manifest(d, "thing", {})["files"]  # never listed when writing
    _with_entry(d, rel, hashlib.sha256((d / rel).read_bytes()).hexdigest())
    with pytest.raises(ArtifactError) as exc:
        read_manifest(d)
    assert_refused(exc.value, "symlink")
    tally["refused:manifest entries through a symlink"] += 1


# ----------------------------------------------------------------------------- safetensors headers that lie


def _st(header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def lying_files() -> dict[str, bytes]:
    a = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]}
    body = bytes(28)
    return {
        "valid": _st({"a": a, "b": b}, body),
        "header length beyond the file": struct.pack("<Q", 10_000) + b"{}",
        "header length 2**63": struct.pack("<Q", 2**63) + b"{}",
        "shorter than its length field": b"\x01\x02\x03",
        "empty": b"",
        "offsets past the end": _st({"a": a, "b": {**b, "data_offsets": [16, 4000]}}, body),
        "end before begin": _st({"a": a, "b": {**b, "data_offsets": [28, 16]}}, body),
        "negative offset": _st({"a": {**a, "data_offsets": [-16, 0]}, "b": b}, body),
        "overlapping tensors": _st({"a": a, "b": {**b, "data_offsets": [8, 20]}}, bytes(20)),
        "gap between tensors": _st({"a": a, "b": {**b, "data_offsets": [20, 32]}}, bytes(32)),
        "bytes after the last tensor": _st({"a": a, "b": b}, body + bytes(8)),
        "shape larger than its bytes": _st({"a": {**a, "shape": [4, 4]}, "b": b}, body),
        "shape product overflowing": _st({"a": {**a, "shape": [2**40, 2**40]}, "b": b}, body),
        "negative dimension": _st({"a": {**a, "shape": [-2, -2]}, "b": b}, body),
        "boolean dimension": _st({"a": {**a, "shape": [True, 4]}, "b": b}, body),
        "float offsets": _st({"a": {**a, "data_offsets": [0.0, 16.0]}, "b": b}, body),
        "unknown dtype": _st({"a": {**a, "dtype": "F128"}, "b": b}, body),
        "entry not an object": _st({"a": [1, 2], "b": b}, body),
        "header is a list": _st([1, 2, 3], body),
        "header is not JSON": _st(b"{not json}", body),
        "header is not UTF-8": _st(b'{"\xff": 1}', body),
        "header nested 100000 deep": _st(b"[" * 100_000, body),
        "header with a 5000-digit number": _st(b'{"a": ' + b"9" * 5000 + b"}", body),
        "metadata not strings": _st({"__metadata__": {"k": 1}, "a": a, "b": b}, body),
        "truncated data": _st({"a": a, "b": b}, body)[:-5],
    }


@pytest.mark.parametrize("case", list(lying_files()))
def test_safetensors_header_that_lies_is_refused(tmp_path, case, tally):
    path = tmp_path / "x.safetensors"
    path.write_bytes(lying_files()[case])
    if case == "valid":
        assert set(load_tensors(path)) == {"a", "b"}
        return
    with pytest.raises(ArtifactError) as exc:
        load_tensors(path)
    assert_refused(exc.value, str(path))
    tally["faults:safetensors header lying about sizes/offsets/types"] += 1
    tally["refused:lying safetensors headers (edgetune loader)"] += 1


@pytest.mark.parametrize("case", [c for c in lying_files() if c != "valid"])
def test_peft_reader_refuses_lying_headers(tmp_path, adapter_dir, case, tally):
    from edgetune.exporters.peft import read_peft

    d = tmp_path / "peft"
    shutil.copytree(adapter_dir, d)
    (d / "adapter_model.safetensors").write_bytes(lying_files()[case])
    with pytest.raises(EdgetuneError) as exc:
        read_peft(d)
    assert_refused(exc.value)
    tally["refused:lying safetensors headers (PEFT reader)"] += 1


# ----------------------------------------------------------------------------- adapters and their base


def test_adapter_for_another_base_needs_force(capsys, tmp_path, adapter_dir, tiny_hf_dir, tally):
    other = tmp_path / "other-base"  # the same architecture, other weights: another sha256
    shutil.copytree(tiny_hf_dir, other)
    state = load_tensors(other / "model.safetensors")
    state = {k: v + 0.01 for k, v in state.items()}
    save_tensors(state, other / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, ["generate", other, "--adapter", adapter_dir, "--prompt", "hi",
                                    "--max-new-tokens", "2"])
    line = error_line(err)
    assert code == 2 and "different base" in line and "--force" in line
    code, out, err = run_cli(capsys, ["generate", other, "--adapter", adapter_dir, "--prompt", "hi",
                                      "--max-new-tokens", "2", "--force"])
    assert code == 0, err
    tally["refused:adapter applied to a different base without --force"] += 1


# ----------------------------------------------------------------------------- outputs are never overwritten


def test_outputs_need_overwrite(capsys, tmp_path, reference_run, compiled_dropout, train_text, tiny_hf_dir, tally):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    a_file = tmp_path / "taken.gguf"
    a_file.write_text("precious")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    attempts = [
        ["compile", tiny_hf_dir, "--recipe", "lora", "--out", taken],
        ["train", compiled_dropout, "--data", train_text, "--steps", "1", "--out", taken],
        ["export", reference_run, "--out", taken],
        ["export", reference_run, "--format", "gguf", "--out", a_file],
        ["export", reference_run, "--out", dangling],
    ]
    for argv in attempts:
        code, _, err = run_cli(capsys, argv)
        assert code == 2 and "already exists" in error_line(err) and "--overwrite" in error_line(err)
    assert (taken / "keep.txt").read_text() == "precious" and a_file.read_text() == "precious"
    assert dangling.is_symlink()
    tally["refused:existing outputs without --overwrite"] += len(attempts)
    code, _, err = run_cli(capsys, ["export", reference_run, "--out", taken, "--overwrite"])
    assert code == 0 and not (taken / "keep.txt").exists() and (taken / MANIFEST).is_file()


# ----------------------------------------------------------------------------- no pickle


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def test_no_pickle_anywhere_in_the_package():
    """No pickle import, no torch.load without weights_only=True, no torch.save, no np.load(allow_pickle)."""
    bad, n_files = [], 0
    for d in PACKAGE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            n_files += 1
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            where = lambda node: f"{path.relative_to(REPO)}:{node.lineno}"  # noqa: E731
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    if name.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib",
                                              "shelve", "marshal"):
                        bad.append(f"{where(node)} imports {name}")
            for node, owner, name in _calls(tree):
                kw = {k.arg: k.value for k in node.keywords}
                if owner == "torch" and name == "load":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        bad.append(f"{where(node)} torch.load without weights_only=True")
                if owner == "torch" and name == "save":
                    bad.append(f"{where(node)} torch.save (pickle)")
                if owner in ("np", "numpy") and name == "load":
                    ap = kw.get("allow_pickle")
                    if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                        bad.append(f"{where(node)} numpy.load with allow_pickle")
                if name in ("loads", "load") and owner in ("pickle", "dill", "marshal"):
                    bad.append(f"{where(node)} {owner}.{name}")
    assert n_files > 20
    assert not bad, bad


def test_a_pickled_checkpoint_is_never_loaded(capsys, tmp_path, tiny_hf_dir):
    d = tmp_path / "bin-only"
    shutil.copytree(tiny_hf_dir, d)
    state = load_tensors(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")  # what a pickle-only Hugging Face directory holds
    code, _, err = run_cli(capsys, ["compile", d, "--recipe", "lora", "--out", tmp_path / "o"])
    assert code == 2 and "safetensors" in error_line(err)


def test_save_tensors_roundtrip_is_plain_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors({"w": torch.arange(6.0).view(2, 3)}, path)
    assert path.read_bytes()[8:9] == b"{"  # a JSON header, no pickle opcode
    assert torch.equal(load_tensors(path)["w"], torch.arange(6.0).view(2, 3))
