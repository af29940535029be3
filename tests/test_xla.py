"""jaxlm.xla: default XLA flags on NVIDIA GPUs, never over the user's own."""

from jax._src import xla_bridge

from jaxlm import xla


def test_a_flag_the_user_set_wins_whatever_its_value():
  defaults = {"--xla_gpu_enable_triton_gemm": "false"}
  assert xla.with_defaults("", defaults) == "--xla_gpu_enable_triton_gemm=false"
  assert xla.with_defaults("--xla_gpu_enable_triton_gemm=true --x=1", defaults) == \
      "--xla_gpu_enable_triton_gemm=true --x=1"
  assert xla.with_defaults("--x=1", defaults) == "--x=1 --xla_gpu_enable_triton_gemm=false"


def test_gpu_defaults_apply_only_with_a_cuda_plugin_before_any_backend(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--x=1")
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setattr(xla, "cuda_plugin_installed", lambda: False)
  xla.apply_default_flags()
  assert xla.os.environ["XLA_FLAGS"] == "--x=1"          # no GPU plugin: nothing added
  monkeypatch.setattr(xla, "cuda_plugin_installed", lambda: True)
  monkeypatch.setenv("JAXLM_XLA_DEFAULTS", "0")
  xla.apply_default_flags()
  assert xla.os.environ["XLA_FLAGS"] == "--x=1"          # turned off by the user
  monkeypatch.delenv("JAXLM_XLA_DEFAULTS")
  xla.apply_default_flags()
  assert xla.os.environ["XLA_FLAGS"] == "--x=1 --xla_gpu_enable_triton_gemm=false"
  monkeypatch.setenv("XLA_FLAGS", "--x=1")
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  xla.apply_default_flags()
  assert xla.os.environ["XLA_FLAGS"] == "--x=1"          # too late: XLA would ignore it
