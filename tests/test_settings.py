"""Settings live in one dataclass (KernelSettings in EngineConfig); LLMOPT_* variables are
overrides parsed once when the config is built, never read at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmopt.config import EngineConfig, KernelSettings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_measured_choices():
    s = KernelSettings()
    assert (s.int4_act, s.int4_a8_max_m, s.large_m, s.decode_tiles, s.fused_decode) == ("int8", 64, 64, True, True)
    assert (s.quant_lm_head, s.lm_head_fmt, s.quant_embed) == (True, "int8", True)
    assert KernelSettings.from_env({}) == s


def test_env_overrides_are_parsed_by_from_env():
    s = KernelSettings.from_env({"LLMOPT_INT4_ACT": "fp32", "LLMOPT_QLINEAR_LARGE_M": "32", "LLMOPT_DECODE_TILES": "0",
                                 "LLMOPT_FUSED_DECODE": "0", "LLMOPT_QUANT_LM_HEAD": "0", "LLMOPT_QUANT_EMBED": "0"})
    assert (s.int4_act, s.large_m, s.int4_a8_max_m, s.decode_tiles, s.fused_decode) == ("fp32", 32, 32, False, False)
    assert (s.quant_lm_head, s.quant_embed) == (False, False)
    assert KernelSettings.from_env({"LLMOPT_QUANT_LM_HEAD": "int4"}).lm_head_fmt == "int4"
    assert KernelSettings.from_env({"LLMOPT_QUANT_LM_HEAD": "1"}).lm_head_fmt is None  # the model's format


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="LLMOPT_INT4_ACT"):
        KernelSettings.from_env({"LLMOPT_INT4_ACT": "int3"})
    with pytest.raises(ValueError, match="LLMOPT_QLINEAR_LARGE_M"):
        KernelSettings.from_env({"LLMOPT_QLINEAR_LARGE_M": "many"})


def test_engine_config_reads_the_environment_once_at_construction(monkeypatch):
    monkeypatch.setenv("LLMOPT_FUSED_DECODE", "0")
    cfg = EngineConfig(num_threads=1)
    monkeypatch.setenv("LLMOPT_FUSED_DECODE", "1")
    assert cfg.kernel_settings.fused_decode is False  # the value at construction
    explicit = EngineConfig(num_threads=1, kernels=KernelSettings(int4_act="fp32"))
    assert explicit.kernel_settings.int4_act == "fp32"


def test_importing_the_library_reads_no_setting_from_the_environment():
    """A bad override breaks nothing at import; it is reported when a config is built."""
    code = ("import llmopt, llmopt.kernels.qlinear, llmopt.quant.linear, llmopt.engine.fused_decode\n"
            "from llmopt.config import EngineConfig\n"
            "try:\n    EngineConfig(num_threads=1)\nexcept ValueError as e:\n    print('config:', e)\n")
    env = {"LLMOPT_INT4_ACT": "bogus", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "config:" in r.stdout and "LLMOPT_INT4_ACT" in r.stdout


def test_default_threads_follow_the_affinity_mask_not_the_machine(monkeypatch):
    # a process pinned to one core (taskset, a cgroup cpuset) must not start two compute threads
    import os

    from llmopt.config import usable_cpus

    monkeypatch.delenv("LLMOPT_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert usable_cpus() == 1
    assert EngineConfig().num_threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert EngineConfig().num_threads == 3
    monkeypatch.setenv("LLMOPT_NUM_THREADS", "2")
    assert EngineConfig().num_threads == 2


def test_int16_prompt_rows_follow_the_cpu_unless_set():
    assert KernelSettings().gguf_prompt_int16 is None  # auto: where int16 beats fp32 (kernels.gguf_linear.int16_fast)
    assert KernelSettings.from_env({}).gguf_prompt_int16 is None
    assert KernelSettings.from_env({"LLMOPT_GGUF_PROMPT_INT16": " Auto "}).gguf_prompt_int16 is None
    for on in ("1", "on", "true", "YES"):
        assert KernelSettings.from_env({"LLMOPT_GGUF_PROMPT_INT16": on}).gguf_prompt_int16 is True
    for off in ("0", "off", "false", "no"):
        assert KernelSettings.from_env({"LLMOPT_GGUF_PROMPT_INT16": off}).gguf_prompt_int16 is False
    with pytest.raises(ValueError, match="LLMOPT_GGUF_PROMPT_INT16='maybe'.*1 \\(on\\), 0 \\(off\\) or auto"):
        KernelSettings.from_env({"LLMOPT_GGUF_PROMPT_INT16": "maybe"})


def test_int16_prompt_rows_where_the_build_makes_them_faster():
    from llmopt.kernels.gguf_linear import bf16x3_available, int16_fast
    from llmopt.models.gguf_linear import prompt_act

    assert [int16_fast(p) for p in ("avx512_amx", "avx512_vnni", "avx512", "avx2")] == [True, True, False, True]
    auto = "bf16x3" if bf16x3_available() else "int16" if int16_fast() else "fp32"
    assert prompt_act("by-kind", True, None) == auto
    assert prompt_act("by-kind", False, True) == "int16" and prompt_act("by-kind", False, False) == "fp32"
    assert prompt_act("fp32", False, True) == "fp32"  # the fp32 mode stays the dequantized model's math
    assert prompt_act("int8", True, None) == "int8"
