"""Preference tuning (jaxlm/finetune/preference.py): records of both layouts, the rows' masks,
DPO's and SimPO's losses against a direct computation, the reference computed once (DPO starts
at log 2 with every pair tied), resume, and bad input in one line. The learning check (a
property the base model lacks, preferred after tuning) is in tests/test_finetune.py, beside the
other objectives' on the same pretrained model."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import finetune
from jaxlm import run as run_lib
from jaxlm.config import ConfigError
from jaxlm.finetune import preference
from jaxlm.model import Transformer
from tests.conftest import random_params


class _CharTokenizer:
  """One id per character."""
  pad_id, eos_id, vocab_size = 0, 1, 130

  def encode_batch(self, texts):
    return [[2 + (ord(c) % 128) for c in t] for t in texts]


def _write(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


TINY_HEADS_TIMES_HEAD_DIM = 32  # conftest.TINY_MODEL: 2 heads x 16 (kv_heads = heads)
PAIRS = [{"prompt": f"Name a colour for item {i}.", "chosen": "bright red", "rejected": "grey"}
         for i in range(24)]


def test_both_layouts_are_read_and_the_prompt_is_formatted(tmp_path):
  plain = preference.read_preferences(_write(tmp_path / "p.jsonl", PAIRS[:1]), "plain")
  assert (plain[0].text, plain[0].response, plain[0].rejected) == (
      "Name a colour for item 0.", "bright red", "grey")
  alpaca = preference.read_preferences(_write(tmp_path / "p.jsonl", PAIRS[:1]), "alpaca")
  assert alpaca[0].text.endswith("### Instruction:\nName a colour for item 0.\n\n### Response:\n")
  talk = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
  hh = {"chosen": talk + " Goodbye, take care.", "rejected": talk + " Whatever."}
  [example] = preference.read_preferences(_write(tmp_path / "hh.jsonl", [hh]), "alpaca")
  assert example.text == talk
  assert (example.response, example.rejected) == (" Goodbye, take care.", " Whatever.")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, r"x\.jsonl:1: field 'rejected' is missing"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, r"x\.jsonl:1: field 'rejected' is "
                                                        r"missing, empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same "}, r"x\.jsonl:1: 'chosen' and "
                                                             r"'rejected' are the same"),
    ({"chosen": "no turns", "rejected": "x"}, r"x\.jsonl:1: .*HH-RLHF.*no "),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"},
     r"x\.jsonl:1: 'chosen' and 'rejected' differ before the last assistant turn"),
    (["not", "an", "object"], r"x\.jsonl:1: a record must be a JSON object"),
])
def test_bad_records_name_file_and_row(tmp_path, record, message):
  path = _write(tmp_path / "x.jsonl", [record])
  with pytest.raises(finetune.FinetuneError, match=message):
    preference.read_preferences(path, "plain")


def test_a_pair_the_context_cannot_hold_names_its_row_and_side(tmp_path):
  record = {"prompt": "p" * 10, "chosen": "ok", "rejected": "r" * 60}
  examples = preference.read_preferences(_write(tmp_path / "x.jsonl", [record]), "plain")
  with pytest.raises(finetune.FinetuneError,
                     match=r"x\.jsonl:1: prompt \+ rejected response are 71 tokens"):
    preference.encode_preferences(examples, _CharTokenizer(), max_length=64)


def test_rows_score_only_each_response_and_its_end(tmp_path):
  examples = preference.read_preferences(_write(tmp_path / "x.jsonl", [
      {"prompt": "abc", "chosen": "de", "rejected": "fghij"}]), "plain")
  split = preference.encode_preferences(examples, _CharTokenizer(), max_length=32)
  batch = finetune.make_batch(split, [0], 2, 32, 0, "preference")
  assert batch["inputs"].shape == batch["rejected_inputs"].shape == (2, 16)  # the longer pair
  # chosen: a b c d e EOS -> inputs a..e, targets b..EOS, scored: d, e, EOS
  np.testing.assert_array_equal(batch["weights"][0, :6], [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(batch["rejected_weights"][0, :9], [0, 0, 1, 1, 1, 1, 1, 1, 0])
  assert batch["targets"][0, 4] == 1 and batch["rejected_targets"][0, 7] == 1  # EOS scored
  assert batch["weights"][1].sum() == batch["row_weight"][1] == 0  # the padding row
  np.testing.assert_array_equal(batch["reference"], 0.0)  # until `annotate`


def _direct_logp(config, params, batch, prefix=""):
  """Sum of log p(target) over the weighted positions, from the full logits."""
  logits = Transformer(config.model).apply(
      {"params": params}, batch[f"{prefix}inputs"], positions=batch[f"{prefix}positions"],
      segment_ids=batch[f"{prefix}segment_ids"])
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch[f"{prefix}targets"][..., None],
                             axis=-1)[..., 0]
  return jnp.sum(logp * batch[f"{prefix}weights"], axis=1)


@pytest.mark.parametrize("loss, chunk", [("dpo", 0), ("dpo", 8), ("simpo", 0)])
def test_the_losses_equal_their_formulas(tmp_path, loss, chunk):
  config = config_lib.validate({
      "model": {"num_layers": 1, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                "vocab_size": 130, "max_seq_len": 32},
      "data": {"seq_len": 32}, "train": {"loss_chunk_size": chunk},
      "finetune": {"objective": "preference", "preference_loss": loss, "beta": 0.5,
                   "label_smoothing": 0.1, "simpo_gamma": 0.3}})
  records = [{"prompt": f"q{i}", "chosen": "yes" * (i + 1), "rejected": "no"} for i in range(3)]
  split = preference.encode_preferences(
      preference.read_preferences(_write(tmp_path / "x.jsonl", records), "plain"),
      _CharTokenizer(), max_length=32)
  split.reference = np.array([[-3.0, -1.0], [-2.0, -2.5], [-7.0, -4.0]], np.float32)
  batch = {k: jnp.asarray(v) for k, v in
           finetune.make_batch(split, range(3), 4, 32, 0, "preference").items()}
  params = nn.unbox(random_params(config.model))
  total, sums = jax.jit(lambda p, b: preference.preference_loss(config)(
      Transformer(config.model), p, b, None))(params, batch)
  chosen, rejected = jax.jit(lambda p, b: (_direct_logp(config, p, b),
                                           _direct_logp(config, p, b, "rejected_")))(params, batch)
  chosen, rejected = np.asarray(chosen), np.asarray(rejected)
  if loss == "dpo":
    z = 0.5 * ((chosen[:3] - split.reference[:, 0]) - (rejected[:3] - split.reference[:, 1]))
  else:
    lengths = [batch["weights"][i].sum() for i in range(3)], [
        batch["rejected_weights"][i].sum() for i in range(3)]
    z = 0.5 * (chosen[:3] / np.array(lengths[0]) - rejected[:3] / np.array(lengths[1])) - 0.3
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  want = -(0.9 * log_sigmoid(z) + 0.1 * log_sigmoid(-z))
  np.testing.assert_allclose(total, want.sum(), rtol=1e-5)
  assert sums["weight_sum"] == 3  # (the padding row weighs nothing)
  np.testing.assert_allclose(sums["chosen_logp_sum"], chosen[:3].sum(), rtol=1e-5)
  margin = z + (0.3 if loss == "simpo" else 0.0)
  assert sums["correct"] == pytest.approx(float(np.sum(margin > 0)))
  assert ("reference_correct" in sums) == (loss == "dpo")
  if loss == "dpo":
    assert sums["reference_correct"] == 1.0  # only the second pair's reference prefers chosen


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def _prepare(tiny_lm_run, workdir, data, **finetune_keys):
  overrides = {"train.global_batch_size": 8, "finetune.template": "plain",
               "finetune.max_new_tokens": 2, "finetune.epochs": 2,
               **{f"finetune.{k}": v for k, v in finetune_keys.items()}}
  return finetune.prepare(tiny_lm_run, str(workdir), "preference", data, overrides)


def test_dpo_starts_at_log_2_with_every_pair_tied_and_resumes_exactly(tiny_lm_run, pairs_file,
                                                                      tmp_path):
  """The reference is the policy at step 0: every reward 0, the loss log 2, accuracy 0.5 (ties
  count half); the reference's own preference is reported; finetune.reference naming the
  init run gives the same reference. A run stopped after 3 steps resumes (recomputing the
  reference) to the uninterrupted run's numbers. Prefix tuning keeps the init run as reference."""
  prepared = _prepare(tiny_lm_run, tmp_path / "a", pairs_file)
  assert prepared.splits["train"].reference.shape == (len(prepared.splits["train"].ids), 2)
  params = finetune.initial_params(prepared.config, finetune.base_params(prepared),
                                   prepared.mesh, prepared.config.seed)
  results = finetune.evaluate_splits(params, prepared)
  assert results["validation_loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert results["validation_preference_accuracy"] == 0.5
  assert results["eval_preference_accuracy"] == 0.5
  reference = prepared.splits["validation"].reference
  assert results["validation_reference_preference_accuracy"] == pytest.approx(
      float(np.mean(reference[:, 0] > reference[:, 1])))

  # finetune.reference naming the init run gives the same reference (another run's model
  # scores the pairs the same way, its own config and params restored).
  named = _prepare(tiny_lm_run, tmp_path / "c", pairs_file, reference=tiny_lm_run)
  np.testing.assert_allclose(named.splits["train"].reference, prepared.splits["train"].reference,
                             rtol=1e-5)

  whole = finetune.finetune(prepared, show_progress=False)
  assert whole["steps"] == 2 * math.ceil(len(prepared.splits["train"].ids) / 8)
  assert whole["validation_preference_accuracy"] > 0.5  # (the same answer on every row)
  finetune.finetune(_prepare(tiny_lm_run, tmp_path / "b", pairs_file), show_progress=False,
                    stop_at_step=3)
  resumed = finetune.finetune(_prepare(tiny_lm_run, tmp_path / "b", pairs_file),
                              show_progress=False)
  for key in ("validation_loss", "test_preference_accuracy", "train_reward_margin"):
    assert resumed[key] == whole[key], key
  assert (tmp_path / "a" / "test_responses.json").exists()

  # Prefix tuning (model.prefix_length): the reference is the init run without the slots (the
  # plain run's log-probabilities); the slots start from real tokens' keys/values; after the
  # run only the slots differ from the init run's params.
  from jaxlm import params as params_lib
  prefixed = finetune.prepare(tiny_lm_run, str(tmp_path / "prefix"), "preference", pairs_file, {
      "train.global_batch_size": 8, "finetune.template": "plain", "finetune.max_new_tokens": 2,
      "finetune.epochs": 1, "model.prefix_length": 4, "optim.learning_rate": 1e-2})
  np.testing.assert_allclose(prefixed.splits["train"].reference,
                             prepared.splits["train"].reference, rtol=1e-5)
  base = params_lib.flatten(jax.device_get(finetune.base_params(prepared)))
  start = params_lib.flatten(jax.device_get(finetune.initial_params(
      prefixed.config, finetune.base_params(prefixed), prefixed.mesh, 0,
      prefix_tokens=prefixed.splits["train"].ids[0])))
  summary = finetune.finetune(prefixed, show_progress=False)
  assert summary["trainable_params"] == 2 * 2 * 4 * TINY_HEADS_TIMES_HEAD_DIM
  tuned = params_lib.flatten(jax.device_get(run_lib.restore_params(
      run_lib.open_run(str(tmp_path / "prefix")), prefixed.mesh)))
  assert set(tuned) == set(base) | {p for p in start if p[-1].startswith("prefix_")}
  for path, value in tuned.items():
    if path[-1].startswith("prefix_"):
      assert np.std(start[path]) > 0.01 and not np.allclose(value, start[path]), path
    else:
      np.testing.assert_array_equal(value, base[path], err_msg=str(path))


def test_preference_settings_are_checked_before_anything_is_written(tiny_lm_run, pairs_file,
                                                                    tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(finetune.FinetuneError, match="finetune.reference is DPO's reference"):
    _prepare(tiny_lm_run, workdir, pairs_file, preference_loss="simpo", reference=tiny_lm_run)
  with pytest.raises(ConfigError, match=r"finetune.label_smoothing=0.5: must be in \[0, 0.5\)"):
    _prepare(tiny_lm_run, workdir, pairs_file, label_smoothing=0.5)
  with pytest.raises(ConfigError, match=r"finetune.beta=0.0"):
    _prepare(tiny_lm_run, workdir, pairs_file, beta=0.0)
  with pytest.raises(ConfigError, match=r"finetune.preference_loss='ppo'"):
    _prepare(tiny_lm_run, workdir, pairs_file, preference_loss="ppo")
  with pytest.raises(finetune.FinetuneError, match=r"finetune.beta is a preference-tuning "
                                                   r"setting .* this run is instruct"):
    finetune.prepare(tiny_lm_run, str(workdir), "instruct", pairs_file, {"finetune.beta": 0.2})
  assert not workdir.exists()
