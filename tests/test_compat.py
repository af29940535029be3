"""Old run directories keep working: a run whose config.json has the format of 2026-12-06
(tests/data/run_2026_12_06: before data.tokens, data.mixture, train.profile_steps and
optim.name existed) and whose checkpoint holds a grain iterator's state resumes, trains on,
and is evaluated and sampled by today's code."""

import json
import os

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import generate as generate_lib
from jaxlm import pretrain
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm import tokenizer as tokenizer_lib
from tests.conftest import REPO
from tests.helpers import losses

OLD_CONFIG = os.path.join(REPO, "tests", "data", "run_2026_12_06", "config.json")


@pytest.mark.e2e
def test_a_run_of_the_old_format_resumes_trains_and_is_evaluated(tmp_path, shared_data_dir):
  with open(OLD_CONFIG) as f:
    values = json.load(f)
  assert "tokens" not in values["data"] and "name" not in values["optim"]
  values["data"]["data_dir"] = str(shared_data_dir)
  workdir = tmp_path / "old_run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(values, indent=2))
  config = config_lib.validate(values)
  tokenizer, _ = tokenizer_lib.get_tokenizer(config.data, config.model.vocab_size)
  (workdir / tokenizer.file_name).write_bytes(tokenizer.serialize())
  # A checkpoint at step 2 as the code of that day wrote it: the data item is a grain
  # iterator's state alone ({"next_index": batches drawn}).
  mesh = run_lib.default_mesh(config)
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  checkpointer = run_lib.checkpointer(str(workdir), async_save=False)
  checkpointer.save(2, state, {"next_index": 2}, values, tokenizer)
  checkpointer.wait()

  summary = pretrain.train(config, str(workdir), show_progress=False)
  assert summary["finished"] and summary["step"] == 4
  assert sorted(losses(workdir)) == [3, 4] and all(np.isfinite(list(losses(workdir).values())))
  config, params, tokenizer = run_lib.load_run(str(workdir))
  result = evaluate_lib.evaluate_documents(config, params, tokenizer, ["import os\n" * 20],
                                           seq_len=32, stride=16, batch_size=2,
                                           mesh=run_lib.default_mesh(config))
  assert np.isfinite(result["loss"]) and result["tokens"] > 0
  [text] = generate_lib.generate_texts(config.model, params, tokenizer, ["def "],
                                       max_new_tokens=4, temperature=0.0)  # (the continuation)
  assert isinstance(text, str) and text


def test_a_fine_tuning_run_of_the_old_format_still_resumes(tmp_path):
  """finetune.task (config.json) and source.json's "task" were renamed "objective": a
  fine-tuning run written before reads under the new names and passes the resume checks."""
  with open(OLD_CONFIG) as f:
    values = json.load(f)
  values["finetune"]["task"] = "classifier"
  config = config_lib.from_dict(values)
  assert config.finetune.objective == "classifier"
  assert run_lib.incompatible_keys(values, config_lib.to_dict(config)) == []
  workdir = tmp_path / "old_finetune"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(values))
  data = {"--data": "0" * 64}
  (workdir / "source.json").write_text(json.dumps(
      {"fine_tuned_from": "/runs/base", "task": "classifier", "data_sha256": data}))
  source = {"fine_tuned_from": "/runs/base", "objective": "classifier", "data_sha256": data}
  run_lib.check_resumable(str(workdir), config, source)  # (no RunError)
  with pytest.raises(run_lib.RunError, match=r"holds a classifier fine-tuning run of /runs/base"):
    run_lib.check_resumable(str(workdir), config, dict(source, objective="instruct"))
