"""Device profiles: every shipped one parses; a user's file works; a bad field is named."""
from __future__ import annotations

import tomllib
from importlib import resources

import pytest

from edgetune.errors import EdgetuneError
from edgetune.profiles import builtin_profiles, load_profile

REQUIRED = {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "laptop-rtx4060-8gb",
            "laptop-rtx3050-4gb", "cpu-16gb"}


def test_builtin_profiles_parse_and_are_sane():
    profiles = builtin_profiles()
    assert REQUIRED <= set(profiles)
    for p in profiles.values():
        assert 0 < p.usable_memory_gib <= p.total_memory_gib
        assert p.default_dtype in p.dtypes
        assert p.memory_bandwidth_gbps > 0 and p.peak_tflops > 0
    assert profiles["cpu-16gb"].default_dtype == "float32"
    assert profiles["jetson-orin-nano-8gb"].compute_capability == "8.7"


def _cpu_table():
    return tomllib.loads((resources.files("edgetune.devices") / "cpu-16gb.toml").read_text())


def _write(tmp_path, table):
    lines = []
    for k, v in table.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, list):
            lines.append(f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]")
        else:
            lines.append(f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
    path = tmp_path / "mine.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_user_profile_file(tmp_path):
    table = _cpu_table() | {"name": "my-box", "usable_memory_gib": 3.5}
    profile = load_profile(str(_write(tmp_path, table)))
    assert profile.name == "my-box" and profile.usable_bytes == int(3.5 * 2**30)


@pytest.mark.parametrize("field,value,needle", [
    ("usable_memory_gib", -1, "usable_memory_gib"),
    ("usable_memory_gib", 99.0, "usable_memory_gib"),
    ("total_memory_gib", "lots", "total_memory_gib"),
    ("dtypes", ["float64"], "dtypes"),
    ("default_dtype", "float16", "default_dtype"),
    ("accelerator", "tpu", "accelerator"),
    ("peak_tflops", True, "peak_tflops"),
])
def test_invalid_field_is_named(tmp_path, field, value, needle):
    path = _write(tmp_path, _cpu_table() | {field: value})
    with pytest.raises(EdgetuneError, match=needle):
        load_profile(str(path))


def test_missing_and_unknown_fields(tmp_path):
    table = _cpu_table()
    del table["memory_bandwidth_gbps"]
    with pytest.raises(EdgetuneError, match="missing field 'memory_bandwidth_gbps'"):
        load_profile(str(_write(tmp_path, table)))
    with pytest.raises(EdgetuneError, match="unknown field"):
        load_profile(str(_write(tmp_path, _cpu_table() | {"colour": "red"})))


def test_broken_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(EdgetuneError, match="invalid TOML"):
        load_profile(str(bad))
    with pytest.raises(EdgetuneError, match="no such device profile file"):
        load_profile(str(tmp_path / "none.toml"))


def test_cuda_context_is_counted_once(tmp_path):
    """Shipped CUDA profiles hold the context in their reserve (0 here); a user profile without the
    field gets the 512 MiB default on top of the tensors; a CPU profile has none."""
    from edgetune.planner import JobSpec, choose, shape_for

    profiles = builtin_profiles()
    for p in profiles.values():
        assert p.cuda_context_mib == 0, p.name  # CPU: no context; CUDA: inside total - usable
    nano = tomllib.loads((resources.files("edgetune.devices") / "jetson-orin-nano-8gb.toml").read_text())
    del nano["cuda_context_mib"]
    own = load_profile(str(_write(tmp_path, nano)))
    assert own.cuda_context_mib == 512 and own.cuda_context_bytes == 512 * 2**20
    shape, job = shape_for("smollm2-135m"), JobSpec("qlora", dtype="bfloat16", act_bits=4)
    a = choose(shape, job, profiles["jetson-orin-nano-8gb"], 1, 256)
    b = choose(shape, job, own, 1, 256)
    assert b.components["overhead"] - a.components["overhead"] == 512 * 2**20
    assert b.total_bytes - a.total_bytes == 512 * 2**20


@pytest.mark.parametrize("value,needle", [
    (-1, "cuda_context_mib"),
    ("big", "cuda_context_mib"),
    (True, "cuda_context_mib"),
    (8 * 1024, "cuda_context_mib"),  # the whole device
    (6.5 * 1024, "leaves no usable memory"),
])
def test_invalid_cuda_context_is_named(tmp_path, value, needle):
    nano = tomllib.loads((resources.files("edgetune.devices") / "jetson-orin-nano-8gb.toml").read_text())
    with pytest.raises(EdgetuneError, match=needle):
        load_profile(str(_write(tmp_path, nano | {"cuda_context_mib": value})))
    with pytest.raises(EdgetuneError, match="cuda_context_mib.*cpu"):
        load_profile(str(_write(tmp_path, _cpu_table() | {"cuda_context_mib": 256})))
