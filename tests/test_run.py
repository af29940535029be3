"""Run directories (jaxlm/run.py): what protects a run from being resumed wrongly or twice."""

import json
import os

import pytest

from jaxlm import config as config_lib
from jaxlm import run as run_lib


class _Tokenizer:
  """What run.py needs of a tokenizer: its file name and content."""
  file_name = "tokenizer.model"

  def __init__(self, content: bytes):
    self.content = content

  def serialize(self) -> bytes:
    return self.content


def test_a_resume_with_another_tokenizer_is_refused(tmp_path):
  """A text_files corpus that changed trains another tokenizer: resuming with it would swap
  the token ids under the trained weights."""
  config = config_lib.validate({})
  run_lib.check_tokenizer(str(tmp_path), _Tokenizer(b"new"))  # no run yet: nothing to compare
  run_lib.write_files(str(tmp_path), config, _Tokenizer(b"old"))
  run_lib.check_tokenizer(str(tmp_path), _Tokenizer(b"old"))
  with pytest.raises(run_lib.RunError, match=r"trained with another tokenizer .*tokenizer\.model "
                     r"differs"):
    run_lib.check_tokenizer(str(tmp_path), _Tokenizer(b"new"))
  assert (tmp_path / "tokenizer.model").read_bytes() == b"old"


def test_one_trainer_per_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  with run_lib.training_lock(workdir):
    with pytest.raises(run_lib.RunError, match=r"is being trained by another process"):
      with run_lib.training_lock(workdir):
        pass
  with run_lib.training_lock(workdir):  # released
    pass
  # A directory holding only the lock (a start killed before its first write) is a new run.
  run_lib.check_resumable(workdir, config_lib.validate({}), {"objective": "classifier"})


def test_a_restore_step_that_does_not_exist_writes_nothing(tmp_path):
  with pytest.raises(run_lib.RunError, match=r"--restore_step=2: .* no such checkpoint "
                     r"\(available steps: none\)"):
    run_lib.check_restore_step(str(tmp_path / "new"), 2)
  assert not os.path.exists(tmp_path / "new")


def test_a_damaged_config_json_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{bad")
  with pytest.raises(run_lib.RunError, match=r"config\.json is damaged"):
    run_lib.open_run(str(tmp_path))


def test_config_diff_keeps_what_the_start_changed_when_resumed(tmp_path):
  file_config = config_lib.to_dict(config_lib.validate({}))
  started = config_lib.validate({"train": {"num_steps": 100}, "model": {"num_layers": 2}})
  run_lib.write_files(str(tmp_path), started, _Tokenizer(b"t"), base_config=file_config)
  # Resumed with --workdir alone (the base is the saved config), then with num_steps=300.
  run_lib.write_files(str(tmp_path), started, _Tokenizer(b"t"),
                      base_config=config_lib.to_dict(started))
  longer = config_lib.replace(started, train={"num_steps": 300})
  run_lib.write_files(str(tmp_path), longer, _Tokenizer(b"t"),
                      base_config=config_lib.to_dict(started))
  diff = json.loads((tmp_path / "config_diff.json").read_text())
  assert diff == {"train.num_steps": {"from": 500, "to": 300},
                  "model.num_layers": {"from": 4, "to": 2}}
  # Resumed from the config file with one override undone: its entry goes.
  undone = config_lib.replace(longer, model={"num_layers": 4})
  run_lib.write_files(str(tmp_path), undone, _Tokenizer(b"t"), base_config=file_config)
  assert json.loads((tmp_path / "config_diff.json").read_text()) == {
      "train.num_steps": {"from": 500, "to": 300}}


def test_a_stride_written_out_resumes_as_the_default_zero():
  """Runs saved before data.stride=0 meant seq_len hold the number: the same windows."""
  saved = config_lib.to_dict(config_lib.validate({"data": {"stride": 256}}))
  assert run_lib.incompatible_keys(saved, config_lib.to_dict(config_lib.validate({}))) == []
  other = config_lib.to_dict(config_lib.validate({"data": {"stride": 128}}))
  assert run_lib.incompatible_keys(saved, other) == ["data.stride"]


def test_written_files_and_staged_runs_follow_the_umask(tmp_path):
  """A teammate, or TensorBoard run as another user, reads a run: its JSON files were 0600 and
  imported/exported directories 0700 (mkstemp/mkdtemp), whatever the umask."""
  from jaxlm import convert, files
  previous = os.umask(0o022)
  try:
    files.write_json(str(tmp_path / "a.json"), {"x": 1})
    with convert.staged(str(tmp_path / "run"), ".import-") as staging:
      files.write_bytes(os.path.join(staging, "b"), b"y")
  finally:
    os.umask(previous)
  assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644
  assert os.stat(tmp_path / "run").st_mode & 0o777 == 0o755
  assert os.stat(tmp_path / "run" / "b").st_mode & 0o777 == 0o644
  assert sorted(os.listdir(tmp_path)) == ["a.json", "run"]  # no temporary file left


def test_a_url_workdir_is_refused_before_a_local_gs_folder_appears(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(run_lib.RunError, match=r"workdir gs://bucket/run is a URL, which this "
                                             r"command does not take"):
    run_lib.check_resumable("gs://bucket/run", config_lib.validate({}), None)
  assert os.listdir(tmp_path) == []


def test_a_folder_with_another_tools_config_json_is_not_taken_for_a_run(tmp_path):
  (tmp_path / "config.json").write_text('{"a": 1}')
  with pytest.raises(run_lib.RunError, match=r"config\.json is not a jaxlm run's config \(it "
                                             r"holds a\); choose another --workdir"):
    run_lib.open_run(str(tmp_path))
  with pytest.raises(run_lib.RunError, match="is not a jaxlm run's config"):
    run_lib.check_resumable(str(tmp_path), config_lib.validate({}), None)


def test_a_run_saved_with_the_old_stride_default_resumes(tmp_path, monkeypatch):
  """Before data.stride=0 meant seq_len its default was 256: a run started with seq_len 128
  saved stride 256, which a new run is refused (it skips tokens) but the old one resumes."""
  from jaxlm import pretrain
  old = config_lib.to_dict(config_lib.validate({"data": {"seq_len": 128, "stride": 128}}))
  old["data"]["stride"] = 256
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(old))

  class Reached(Exception):
    pass

  def reached(*args, **kwargs):
    raise Reached
  monkeypatch.setattr(pretrain.tokenizer_lib, "get_tokenizer", reached)
  with pytest.raises(Reached):  # (past every check of the config: the resume goes on)
    pretrain.prepare(config_lib.from_dict(old), str(workdir))
  with pytest.raises(config_lib.ConfigError, match=r"data\.stride=256 exceeds data\.seq_len"):
    pretrain.prepare(config_lib.from_dict(old), str(tmp_path / "new"))
  with pytest.raises(run_lib.RunError, match=r"different data\.stride .*it was started with "
                                             r"data\.stride=256"):
    run_lib.check_resumable(str(workdir), config_lib.validate({"data": {"seq_len": 128}}), None)
