"""Crash-safe training: SIGKILL at random steps and mid-checkpoint, SIGTERM/SIGINT, a full disk,
out of memory, corrupt and torn checkpoints. Every resumed run must end with exactly the
parameters of an uninterrupted run of the same seed (bitwise, on CPU), each step logged once.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import STEPS, error_line, run_cli, train_argv
from safetensors.torch import load_file

from edgetune.cli import main
from edgetune.errors import ArtifactError
from edgetune.training import checkpoint as ckpt_mod
from edgetune.training.checkpoint import list_checkpoints, read_checkpoint
from edgetune.training.report import MetricsLog

REPO = Path(__file__).resolve().parents[2]
KILL_STEPS = sorted(random.Random(8).sample(range(2, STEPS - 2), 3))  # three distinct steps, reproducibly
MID_CHECKPOINT_STEP = 6  # a kill inside the write of this step's checkpoint

# Runs in a child process: SIGKILL itself half way through writing a checkpoint's optimizer file.
KILL_MID_WRITE = r"""
import os, signal, sys
import edgetune.training.checkpoint as c
orig, target = c.save_tensors, "step-%08d" % int(os.environ["KILL_IN_CHECKPOINT"])
def save(tensors, path, metadata=None):
    orig(tensors, path, metadata)
    if target in str(path) and path.name == "optimizer.safetensors":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # torn
        os.kill(os.getpid(), signal.SIGKILL)
c.save_tensors = save
from edgetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ----------------------------------------------------------------------------- helpers


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_as_reference(run: Path, reference: Path) -> None:
    mine, ref = load_file(str(run / "trainable.safetensors")), load_file(str(reference / "trainable.safetensors"))
    assert mine.keys() == ref.keys()
    unequal = [k for k in ref if not torch.equal(mine[k], ref[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    got, want = metrics(run), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1)), "a step is missing or duplicated"
    # the same batch at every step (data position) and the same loss, bitwise
    assert [(m["data"], m["loss"], m["lr"]) for m in got] == [(m["data"], m["loss"], m["lr"]) for m in want]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "temporaries left behind"


def signal_after_step(monkeypatch, step: int, *signums: int) -> None:
    """Deliver ``signums`` to this process right after ``step`` is logged."""
    orig = MetricsLog.write

    def write(self, record):
        orig(self, record)
        if record["step"] == step:
            for s in signums:
                os.kill(os.getpid(), s)

    monkeypatch.setattr(MetricsLog, "write", write)


# ----------------------------------------------------------------------------- SIGKILL, in real processes


@pytest.fixture(scope="module")
def killed_runs(request, tmp_path_factory, compiled_dropout, train_text):
    """Start ``python -m edgetune train`` four times at once; SIGKILL three at random steps (from
    outside, when metrics.jsonl shows the step) and let the fourth SIGKILL itself mid-checkpoint.

    The uninterrupted reference run trains in this process meanwhile.
    """
    root = tmp_path_factory.mktemp("killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = {}
    for k in KILL_STEPS:
        out = root / f"kill-at-{k}"
        argv = train_argv(compiled_dropout, train_text, out, "--save-every", "1", "--keep", "2")
        log = open(root / f"kill-at-{k}.stderr", "w")
        procs[k] = (out, subprocess.Popen([sys.executable, "-m", "edgetune", *argv], env=env, cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=log))
    out = root / "kill-mid-checkpoint"
    argv = train_argv(compiled_dropout, train_text, out, "--save-every", "1", "--keep", "3")
    mid = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, *argv], cwd=REPO,
                           env=dict(env, KILL_IN_CHECKPOINT=str(MID_CHECKPOINT_STEP)),
                           stdout=subprocess.DEVNULL, stderr=open(root / "mid.stderr", "w"))

    logged_at_kill = {}

    def killer():
        deadline = time.monotonic() + 400
        pending = dict(procs)
        while pending and time.monotonic() < deadline:
            for k, (run, proc) in list(pending.items()):
                path = run / "metrics.jsonl"
                n = len(path.read_text().splitlines()) if path.exists() else 0
                if n >= k or proc.poll() is not None:
                    proc.kill()  # SIGKILL
                    proc.wait()
                    logged_at_kill[k] = n
                    del pending[k]
            time.sleep(0.002)
        for _, proc in pending.values():
            proc.kill()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    request.getfixturevalue("reference_run")  # trains here while the children start up
    thread.join(timeout=420)
    mid.wait(timeout=420)
    result = {"kills": {}, "mid": (out, mid.returncode)}
    for k, (run, proc) in procs.items():
        result["kills"][k] = (run, proc.returncode, logged_at_kill.get(k))
    return result


@pytest.fixture(scope="module")
def reference(reference_run, killed_runs):
    return reference_run


def test_kill_steps_are_random_but_reproducible():
    assert len(set(KILL_STEPS)) == 3 and all(2 <= k < STEPS - 2 for k in KILL_STEPS)


@pytest.mark.parametrize("k", KILL_STEPS)
def test_sigkill_at_a_random_step_then_resume_is_bitwise_equal(capsys, killed_runs, reference, compiled_dropout,
                                                              train_text, tally, k):
    run, returncode, logged = killed_runs["kills"][k]
    assert returncode == -signal.SIGKILL, f"the run was not killed (exit {returncode})"
    assert logged is not None and k <= logged < STEPS, logged
    assert not (run / "manifest.json").exists()  # it really stopped before finishing
    tally["faults:SIGKILL at a random step"] += 1
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, run, "--save-every", "1", "--keep", "2",
                                              "--resume"))
    assert code == 0, err
    assert "resuming" in err and "Traceback" not in err
    assert_same_as_reference(run, reference)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000010", "step-00000011"]
    tally["resumed:runs killed and resumed, equal to the uninterrupted run"] += 1


def test_sigkill_mid_checkpoint_write_resumes_from_the_previous_one(capsys, killed_runs, reference,
                                                                    compiled_dropout, train_text, tally):
    run, returncode = killed_runs["mid"]
    assert returncode == -signal.SIGKILL
    torn = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(f".step-{MID_CHECKPOINT_STEP:08d}.tmp-")]
    assert len(torn) == 1 and (torn[0] / "trainable.safetensors").is_file()
    assert list_checkpoints(run)[-1].name == f"step-{MID_CHECKPOINT_STEP - 1:08d}"
    tally["faults:SIGKILL inside a checkpoint write"] += 1
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, run, "--save-every", "1", "--keep", "3",
                                              "--resume"))
    assert code == 0, err
    assert f"from checkpoint step {MID_CHECKPOINT_STEP - 1} of" in err
    assert_same_as_reference(run, reference)
    tally["resumed:runs killed and resumed, equal to the uninterrupted run"] += 1


# ----------------------------------------------------------------------------- SIGTERM / SIGINT, in process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_with_resume_hint(capsys, monkeypatch, tmp_path, reference, compiled_dropout,
                                                       train_text, tally, signum):
    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "0", "--save-interval-s", "0")
    signal_after_step(monkeypatch, 5, signum)
    handler_before = signal.getsignal(signum)
    code, _, err = run_cli(capsys, argv)
    line = error_line(err)
    assert code == 130
    assert signal.Signals(signum).name in line and "after step 5 of 12" in line and "--resume" in line
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005"]  # written by the interrupt alone
    assert signal.getsignal(signum) is handler_before
    tally[f"faults:{signal.Signals(signum).name}"] += 1
    monkeypatch.undo()
    code, _, err = run_cli(capsys, argv + ["--resume"])
    assert code == 0, err
    assert_same_as_reference(run, reference)
    tally["resumed:runs interrupted by a signal and resumed, equal"] += 1


def test_second_signal_aborts_but_keeps_the_last_complete_step(capsys, monkeypatch, tmp_path, reference,
                                                                compiled_dropout, train_text, tally):
    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "0", "--save-interval-s", "0")
    signal_after_step(monkeypatch, 4, signal.SIGTERM, signal.SIGTERM)
    code, _, err = run_cli(capsys, argv)
    assert code == 130 and "aborted after step 4 of 12" in error_line(err)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    tally["faults:double SIGTERM"] += 1
    monkeypatch.undo()
    assert run_cli(capsys, argv + ["--resume"])[0] == 0
    assert_same_as_reference(run, reference)
    tally["resumed:runs interrupted by a signal and resumed, equal"] += 1


def test_signal_inside_the_optimizer_update_never_checkpoints_half_a_step(capsys, monkeypatch, tmp_path, reference,
                                                                         compiled_dropout, train_text, tally):
    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "1")
    orig, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        out = orig(self, *a, **kw)  # parameters of step 7 are already updated...
        calls.append(1)
        if len(calls) == 7:  # ...when the user hits Ctrl-C twice
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    code, _, err = run_cli(capsys, argv)
    line = error_line(err)
    assert code == 130 and "aborted during step 7" in line and "checkpoint of step 6 is intact" in line
    assert list_checkpoints(run)[-1].name == "step-00000006"
    tally["faults:double SIGINT inside the optimizer update"] += 1
    monkeypatch.undo()
    assert run_cli(capsys, argv + ["--resume"])[0] == 0
    assert_same_as_reference(run, reference)
    tally["resumed:runs interrupted by a signal and resumed, equal"] += 1


# ----------------------------------------------------------------------------- torn and corrupt checkpoints


def test_corrupt_and_torn_newest_checkpoints_are_skipped_with_a_warning(capsys, monkeypatch, tmp_path, reference,
                                                                      compiled_dropout, train_text, tally):
    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "2", "--keep", "3")
    signal_after_step(monkeypatch, 8, signal.SIGTERM)
    assert run_cli(capsys, argv)[0] == 130
    monkeypatch.undo()
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006", "step-00000008"]
    # newest: bytes flipped in the middle of its parameters
    target = ckpts / "step-00000008" / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    # newer still: a copy torn before its manifest was written, and a killed atomic write
    shutil.copytree(ckpts / "step-00000006", ckpts / "step-00000010")
    (ckpts / "step-00000010" / "manifest.json").unlink()
    (ckpts / ".step-00000009.tmp-abc123").mkdir()
    (ckpts / ".step-00000009.tmp-abc123" / "trainable.safetensors").write_bytes(b"\x00" * 10)
    tally["faults:checkpoint with flipped bytes"] += 1
    tally["faults:checkpoint without manifest"] += 1
    tally["faults:torn checkpoint temporary"] += 1

    code, _, err = run_cli(capsys, argv + ["--resume"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 2
    assert "step-00000010" in warnings[0] and "no manifest.json" in warnings[0]
    assert "step-00000008" in warnings[1] and "trainable.safetensors" in warnings[1] and "checksum" in warnings[1]
    assert "from checkpoint step 6 of" in err
    tally["refused:corrupt or torn checkpoints skipped on resume"] += 2
    assert_same_as_reference(run, reference)
    tally["resumed:runs resumed past corrupt checkpoints, equal"] += 1


def _model_params(run: Path) -> dict:
    """The trainable parameters of a run's model, in the model's order (what optimizer indices refer to)."""
    from edgetune.api import load_compiled

    model, _ = load_compiled(json.loads((run / "manifest.json").read_text())["compiled"]["path"])
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _mutations(path: Path):
    """(name, mutate) pairs: each damages one file of a checkpoint copy."""
    for f in sorted(p.name for p in path.iterdir()):
        yield f"{f} truncated", lambda d, f=f: (d / f).write_bytes((d / f).read_bytes()[: (d / f).stat().st_size // 2])
        yield f"{f} one byte flipped", lambda d, f=f: _flip(d / f)
        yield f"{f} deleted", lambda d, f=f: (d / f).unlink()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_damaged_checkpoint_file_is_refused(tmp_path, reference, tally):
    good = list_checkpoints(reference)[-1]
    params = _model_params(reference)
    assert read_checkpoint(good, params)["state"]["step"] == 11
    n = 0
    for name, mutate in _mutations(good):
        copy = tmp_path / f"c{n}" / "checkpoints" / good.name
        shutil.copytree(good, copy)
        mutate(copy)
        with pytest.raises(ArtifactError) as exc:
            read_checkpoint(copy, params)
        assert "\n" not in str(exc.value) and str(copy) in str(exc.value), (name, exc.value)
        n += 1
    assert n == 3 * 6  # 6 files: trainable, optimizer, rng, state, metrics, manifest
    tally["faults:checkpoint file truncated, flipped or deleted"] += n
    tally["refused:corrupt checkpoint files"] += n


def test_checkpoint_that_verifies_but_does_not_fit_is_refused(tmp_path, reference, tally):
    """A manifest only proves the files are as written; the contents must also fit the model."""
    from edgetune.manifest import write_manifest

    good = list_checkpoints(reference)[-1]
    params = _model_params(reference)
    cases = {
        "step": lambda d: _edit_state(d, step=3),
        "params": lambda d: ckpt_mod.save_tensors({"x": torch.zeros(2)}, d / "trainable.safetensors"),
        "optimizer key": lambda d: ckpt_mod.save_tensors({"bogus": torch.zeros(1)}, d / "optimizer.safetensors"),
        "rng": lambda d: ckpt_mod.save_tensors({"torch": torch.zeros(3)}, d / "rng.safetensors"),
        "no data": lambda d: _edit_state(d, data=None),
    }
    for name, mutate in cases.items():
        copy = tmp_path / name / "checkpoints" / good.name
        shutil.copytree(good, copy)
        mutate(copy)
        write_manifest(copy, "checkpoint", {"step": 11})
        with pytest.raises(ArtifactError):
            read_checkpoint(copy, params)
    tally["refused:checkpoints that verify but do not fit the run"] += len(cases)


def _edit_state(d: Path, **changes) -> None:
    state = json.loads((d / "state.json").read_text())
    state.update(changes)
    (d / "state.json").write_text(json.dumps(state))


# ----------------------------------------------------------------------------- disk full


def _enospc(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(capsys, monkeypatch, tmp_path, reference,
                                                              compiled_dropout, train_text, tally):
    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "1", "--keep", "2")
    orig = ckpt_mod.save_tensors

    def save(tensors, path, metadata=None):
        if "step-00000005" in str(path) and path.name == "optimizer.safetensors":
            path.write_bytes(b"\x00" * 100)  # what fitted before the disk filled
            _enospc(path)
        return orig(tensors, path, metadata)

    monkeypatch.setattr(ckpt_mod, "save_tensors", save)
    code, _, err = run_cli(capsys, argv)
    line = error_line(err)
    assert code == 2
    assert "out of disk space" in line and "step-00000005" in line and "step 4 is intact" in line and "--resume" in line
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000004"]
    for p in list_checkpoints(run):
        read_checkpoint(p)  # both verify
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    tally["faults:disk full (ENOSPC) writing a checkpoint"] += 1
    monkeypatch.undo()
    assert run_cli(capsys, argv + ["--resume"])[0] == 0
    assert_same_as_reference(run, reference)
    tally["resumed:runs resumed after a full disk, equal"] += 1


@pytest.mark.parametrize("where", ["metrics", "final"])
def test_disk_full_elsewhere_in_training_is_one_line(capsys, monkeypatch, tmp_path, reference, compiled_dropout,
                                                     train_text, tally, where):
    from edgetune.training import loop

    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "1", "--keep", "2")
    if where == "metrics":
        orig = MetricsLog.write
        monkeypatch.setattr(MetricsLog, "write",
                            lambda self, r: _enospc(self.path) if r["step"] == 3 else orig(self, r))
    else:
        monkeypatch.setattr(loop, "save_tensors", lambda t, p, m=None: _enospc(p))
    code, _, err = run_cli(capsys, argv)
    line = error_line(err)
    assert code == 2 and "out of disk space" in line and "--resume" in line
    assert not (run / "trainable.safetensors").exists() and not (run / "manifest.json").exists()
    tally[f"faults:disk full (ENOSPC) writing {where} output"] += 1
    monkeypatch.undo()
    assert run_cli(capsys, argv + ["--resume"])[0] == 0
    assert_same_as_reference(run, reference)
    tally["resumed:runs resumed after a full disk, equal"] += 1


def test_disk_full_compiling_or_exporting_leaves_nothing(capsys, monkeypatch, tmp_path, tiny_hf_dir, reference,
                                                         tally):
    import safetensors.torch

    from edgetune import artifact

    monkeypatch.setattr(artifact, "save_tensors", lambda t, p, m=None: _enospc(p))
    code, _, err = run_cli(capsys, ["compile", tiny_hf_dir, "--recipe", "lora", "--out", tmp_path / "c"])
    assert code == 2 and "out of disk space" in error_line(err)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, p, metadata=None: _enospc(p))
    code, _, err = run_cli(capsys, ["export", reference, "--out", tmp_path / "a"])
    assert code == 2 and "out of disk space" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporaries
    tally["faults:disk full (ENOSPC) compiling or exporting"] += 2


# ----------------------------------------------------------------------------- out of memory


OOM = {
    "MemoryError": lambda: MemoryError(),
    "CUDA OOM": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.6 GiB)"),
    "CPU allocator": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                          "can't allocate memory: you tried to allocate 1073741824 bytes."),
}


@pytest.mark.parametrize("kind", list(OOM))
def test_out_of_memory_is_one_line_with_advice(capsys, monkeypatch, tmp_path, compiled_dropout, train_text, tally,
                                               kind):
    from edgetune.methods.lora.layer import LoraLinear

    orig, calls = LoraLinear.forward, []

    def forward(self, x):
        calls.append(1)
        if len(calls) == 14 * 2 + 3:  # during the forward of step 3
            raise OOM[kind]()
        return orig(self, x)

    monkeypatch.setattr(LoraLinear, "forward", forward)
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, tmp_path / "r", "--save-every", "1"))
    line = error_line(err)
    assert code == 2
    assert "out of memory at step 3" in line and "--batch 1" in line and "--seq-len 16" in line
    tally[f"faults:out of memory ({kind})"] += 1


def test_memory_error_outside_the_loop_and_other_errors(capsys, monkeypatch, tmp_path, compiled_dropout, train_text,
                                                        tally):
    from edgetune.methods.lora.layer import LoraLinear
    from edgetune.training import data

    monkeypatch.setattr(data, "build_dataset", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, tmp_path / "r"))
    assert code == 2 and "out of memory" in error_line(err)
    tally["faults:out of memory (MemoryError loading data)"] += 1
    monkeypatch.undo()
    # a RuntimeError that is not about memory is a bug and must not be dressed up as one
    monkeypatch.setattr(LoraLinear, "forward", lambda self, x: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        main(train_argv(compiled_dropout, train_text, tmp_path / "r2"))


# ----------------------------------------------------------------------------- what --resume accepts


def test_resume_refuses_other_options_or_data(capsys, monkeypatch, tmp_path, compiled_dropout, train_text, tally):
    run = tmp_path / "run"
    argv = train_argv(compiled_dropout, train_text, run, "--save-every", "2")
    signal_after_step(monkeypatch, 4, signal.SIGTERM)
    assert run_cli(capsys, argv)[0] == 130
    monkeypatch.undo()
    code, _, err = run_cli(capsys, argv + ["--resume", "--lr", "1e-3"])
    assert code == 2 and "--lr" in error_line(err) and "same options" in error_line(err)
    other = tmp_path / "other.txt"
    other.write_text(train_text.read_text().replace("fox", "cat"))
    code, _, err = run_cli(capsys, [other if a == str(train_text) else a for a in argv] + ["--resume"])
    assert code == 2 and "training data changed" in error_line(err)
    # options that do not change the result may differ
    code, _, err = run_cli(capsys, argv + ["--resume", "--save-every", "5", "--keep", "1"])
    assert code == 0, err
    tally["refused:resume with other options or data"] += 2


def test_resume_of_a_finished_run_does_nothing(capsys, tmp_path, reference, compiled_dropout, train_text):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "trainable.safetensors").read_bytes()
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, run, "--save-every", "1", "--resume"))
    assert code == 0 and "already finished" in err
    assert (run / "trainable.safetensors").read_bytes() == before


def test_resume_target_must_be_a_run(capsys, tmp_path, compiled_dropout, train_text, tally):
    not_a_run = tmp_path / "home"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("precious")
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, not_a_run, "--resume"))
    assert code == 2 and "not an edgetune run" in error_line(err)
    a_file = tmp_path / "file"
    a_file.write_text("precious")
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, a_file, "--resume"))
    assert code == 2 and "not a run directory" in error_line(err)
    assert a_file.read_text() == "precious" and (not_a_run / "notes.txt").read_text() == "precious"
    tally["refused:--resume into something that is not a run"] += 2


def test_one_process_per_run_directory(capsys, tmp_path, compiled_dropout, train_text):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".edgetune.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, run, "--resume"))
    finally:
        os.close(fd)
    assert code == 2 and "another edgetune process" in error_line(err)


def test_time_rule_checkpoints_without_save_every(capsys, monkeypatch, tmp_path, compiled_dropout, train_text):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, train_argv(compiled_dropout, train_text, run, "--save-every", "0",
                                              "--save-interval-s", "1e-9", "--keep", "2"))
    assert code == 0, err
    assert [p.name for p in list_checkpoints(run)] == ["step-00000010", "step-00000011"]
    run2 = tmp_path / "run2"
    assert run_cli(capsys, train_argv(compiled_dropout, train_text, run2, "--save-every", "0",
                                      "--save-interval-s", "0"))[0] == 0
    assert list_checkpoints(run2) == []
