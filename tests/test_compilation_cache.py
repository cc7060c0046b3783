"""Where main.py points jax's persistent compilation cache (`config.compilation_cache`)."""

import jax

from mode_jax import stages


def _record(monkeypatch):
    calls = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.__setitem__(name, value))
    return calls


def test_auto_uses_the_workdir_and_caches_every_program(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    calls = _record(monkeypatch)
    path = stages.use_compilation_cache("auto", str(tmp_path))
    assert path == str(tmp_path / "jax_cache") and (tmp_path / "jax_cache").is_dir()
    assert calls == {"jax_compilation_cache_dir": path,
                     "jax_persistent_cache_min_compile_time_secs": 0.0}


def test_off_a_directory_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    calls = _record(monkeypatch)
    assert stages.use_compilation_cache("", str(tmp_path)) is None and not calls
    assert stages.use_compilation_cache(str(tmp_path / "c"), "unused") == str(tmp_path / "c")
    assert calls["jax_compilation_cache_dir"] == str(tmp_path / "c")
    calls.clear()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert stages.use_compilation_cache("auto", str(tmp_path)) == str(tmp_path / "env")
    assert not calls and not (tmp_path / "jax_cache").exists()
