"""Hardware profiles: every shipped profile validates; broken ones say where and what."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.errors import ProfileError, UnknownProfileError
from edgeserve.profiles import list_profiles, load_profile, parse_profile

REQUIRED = {"generic-cpu", "raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano",
            "coral-dev-board", "esp32-s3", "iphone-15-pro", "pixel-8", "x86-industrial-pc"}


def test_all_shipped_profiles_validate() -> None:
    """Every shipped TOML parses into a profile whose name matches its file."""
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) >= REQUIRED
    for profile in profiles.values():
        assert profile.artifacts, profile.name
        assert profile.budgets.max_model_bytes > 0


def test_profiles_cover_device_classes() -> None:
    """The shipped set spans MCU, phone, SBC, accelerator board and industrial PC."""
    classes = {p.device_class for p in list_profiles()}
    assert {"mcu", "phone", "sbc", "gpu-sbc", "accelerator-board", "industrial-pc"} <= classes


def test_unknown_profile_lists_close_matches() -> None:
    """A misspelt name suggests the real ones."""
    with pytest.raises(UnknownProfileError, match="did you mean raspberry-pi-5"):
        load_profile("raspbery-pi-5")


def test_broken_profile_names_file_key_found_expected(tmp_path: Path) -> None:
    """A wrong type names the file, the key path, the value found and what was expected."""
    text = (Path(__file__).parents[2] / "hw-profiles" / "raspberry-pi-5.toml").read_text()
    bad = tmp_path / "raspberry-pi-5.toml"
    bad.write_text(text.replace("cores = 4", 'cores = "four"'))
    with pytest.raises(ProfileError) as info:
        load_profile(bad)
    message = str(info.value)
    assert str(bad) in message and "hardware.cores" in message and "'four'" in message
    assert "integer" in message


def test_unknown_key_is_reported(tmp_path: Path) -> None:
    """A typo in a key is not silently ignored."""
    text = (Path(__file__).parents[2] / "hw-profiles" / "pixel-8.toml").read_text()
    with pytest.raises(ProfileError, match="budgets.max_modle_bytes"):
        parse_profile(text.replace("max_model_bytes", "max_modle_bytes"), "pixel-8.toml")


def test_invalid_toml_is_reported() -> None:
    """TOML syntax errors carry the parser's line information."""
    with pytest.raises(ProfileError, match="not valid TOML.*line 2"):
        parse_profile("name = \"x\"\ncores = = 4\n", "x.toml")


def test_artifact_without_runtime_is_refused() -> None:
    """A profile asking for TFLite artifacts must declare a TFLite runtime."""
    text = (Path(__file__).parents[2] / "hw-profiles" / "x86-industrial-pc.toml").read_text()
    text += '\n[[artifacts]]\nformat = "tflite"\nprecision = "fp32"\n'
    with pytest.raises(ProfileError, match="no runtime for it"):
        parse_profile(text, "x86-industrial-pc.toml")


def test_profile_path_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiles on EDGESERVE_PROFILE_PATH are found by name and listed."""
    text = (Path(__file__).parents[2] / "hw-profiles" / "generic-cpu.toml").read_text()
    (tmp_path / "my-board.toml").write_text(text.replace('"generic-cpu"', '"my-board"'))
    monkeypatch.setenv("EDGESERVE_PROFILE_PATH", str(tmp_path))
    assert load_profile("my-board").name == "my-board"
    assert "my-board" in {p.name for p in list_profiles()}


def test_budget_defaults_merge() -> None:
    """Profiles get default validation budgets for every precision."""
    profile = load_profile("esp32-s3")
    assert profile.budget_for("int8").min_cosine <= profile.budget_for("fp32").min_cosine
