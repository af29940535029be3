"""Preference tuning: DPO (Rafailov et al. 2023) and the reference-free SimPO (Meng et al.
2024) on pairs of responses to one prompt, the chosen one preferred to the rejected one.

Records (JSONL, JSON, or any format of `files.read_records`), either
  {"prompt": ..., "chosen": ..., "rejected": ...}  the prompt formatted by finetune.template as
                                                  instruct formats an instruction (alpaca,
                                                  chat, or the init run's chat template: model)
  {"chosen": ..., "rejected": ...}                Anthropic HH-RLHF's layout: two whole
                                                  conversations that share everything up to
                                                  the last "\n\nAssistant:", used as written
Each response is followed by the end-of-text token (with template=model: the template's end
of turn), as instruct trains it.

A batch row holds both sequences of a pair (inputs/targets/weights and rejected_*): the model
reads them as one batch of 2 x rows. The log-probability of a response is the sum over its
tokens (weights 1 on the response and its end, 0 on the prompt and padding).

  dpo    z = beta x ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
  simpo  z = beta x (log pi(chosen) / |chosen| - log pi(rejected) / |rejected|) - simpo_gamma
  loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z), e = finetune.label_smoothing (cDPO)

The reference log-probabilities are computed once, before training, by the init run's model
(or finetune.reference's), so the train step holds one model. The implicit rewards are
beta x (log pi - log ref) (DPO) or beta x log pi / |response| (SimPO); a pair is ranked right
when the chosen reward is higher (a tie counts half: before training every DPO reward is 0).
Every evaluation reports, per split, preference_accuracy, reward_margin, chosen/rejected
rewards and log-probs; the validation split's accuracy is also eval_preference_accuracy, and
it picks the best checkpoint. After training the test prompts are answered greedily
(test_responses.json, as instruct: `exact_match` against the chosen response).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import chat, files, sharding
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import loss as loss_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm.config import Config, FinetuneConfig
from jaxlm.finetune import instruct
from jaxlm.finetune.objective import (
  Batch,
  Encoded,
  Example,
  FinetuneError,
  Objective,
  batches,
  register,
)
from jaxlm.model import Transformer, apply_to_batch, lm_head

HH_ASSISTANT = "\n\nAssistant:"  # HH-RLHF: where the last assistant turn (the answer) starts
SEQUENCE_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


# -- Records -------------------------------------------------------------------------------------

def split_conversations(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
  """(prompt, chosen answer, rejected answer) of two HH-RLHF conversations: the prompt is all
  of the chosen conversation up to and including its last "\\n\\nAssistant:", which the
  rejected one must share."""
  cut = chosen.rfind(HH_ASSISTANT)
  if cut < 0:
    raise FinetuneError(f"{where}: a record without 'prompt' is read as HH-RLHF's two "
                        f"conversations, but 'chosen' has no \"\\n\\nAssistant:\" turn; add a "
                        f"'prompt' field, or write the conversations as HH-RLHF does.")
  prompt = chosen[:cut + len(HH_ASSISTANT)]
  if not rejected.startswith(prompt):
    raise FinetuneError(f"{where}: 'chosen' and 'rejected' differ before the last assistant "
                        f"turn; HH-RLHF pairs share the conversation and differ in the answer.")
  return prompt, chosen[len(prompt):], rejected[len(prompt):]


def read_preferences(path: str, template: str, flag: str = "--data",
                     chat_template: chat.ChatTemplate | None = None) -> list[Example]:
  """Examples of a preference file (see the module doc): the formatted prompt as `text`, the
  chosen answer as `response`, the rejected one as `rejected` (with a chat template, also
  their targets as the template writes them). FinetuneError naming the row for a record
  missing a side, with an empty side, or with the same answer on both sides."""
  records = files.read_records(path, FinetuneError, flag)
  if not records:
    raise FinetuneError(f"{path} has no records.")
  examples = []
  for where, record in records:
    if not isinstance(record, dict):
      raise FinetuneError(f"{where}: a record must be a JSON object with chosen/rejected.")
    fields = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    for field in fields:
      if not isinstance(record.get(field), str) or not record[field].strip():
        raise FinetuneError(
            f"{where}: field '{field}' is missing, empty or not a string (fields: "
            f"{', '.join(sorted(map(str, record))) or 'none'}); a preference record has "
            f"'prompt', 'chosen' and 'rejected' (or HH-RLHF's 'chosen' and 'rejected').")
    if "prompt" in record:
      prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    else:
      prompt, chosen, rejected = split_conversations(record["chosen"], record["rejected"], where)
    if chosen.strip() == rejected.strip():
      raise FinetuneError(f"{where}: 'chosen' and 'rejected' are the same answer; a pair "
                          f"must differ (drop the record).")
    if "prompt" not in record:  # (HH-RLHF's conversation is already formatted)
      examples.append(Example(where, prompt, response=chosen, rejected=rejected, record=record))
    elif template == "model":
      examples.append(Example(where, chat_template.prompt(prompt), response=chosen,
                              rejected=rejected, record=record,
                              target=chat_template.answer(prompt, chosen),
                              rejected_target=chat_template.answer(prompt, rejected)))
    else:
      examples.append(Example(where, instruct.format_prompt(prompt, "", template),
                              response=chosen, rejected=rejected, record=record))
  return examples


def encode_preferences(examples: Sequence[Example], tokenizer, max_length: int) -> Encoded:
  """Prompt + chosen + EOS (`ids`) and prompt + rejected + EOS (`rejected_ids`) per example
  (a chat template's targets end with its end of turn instead); FinetuneError naming the row
  when either does not fit max_length + 1 tokens."""
  prompts = tokenizer.encode_batch([e.text for e in examples])
  chosen = tokenizer.encode_batch([e.target or e.response for e in examples])
  rejected = tokenizer.encode_batch([e.rejected_target or e.rejected for e in examples])
  ids, rejected_ids, prompt_lengths = [], [], []
  for example, prompt, *answers in zip(examples, prompts, chosen, rejected):
    pair = [list(prompt) + list(a) + ([] if example.target else [tokenizer.eos_id])
            for a in answers]
    for side, sequence in zip(("chosen", "rejected"), pair):
      if len(sequence) - 1 > max_length:  # inputs are the sequence minus its last token
        raise FinetuneError(
            f"{example.where}: prompt + {side} response are {len(sequence)} tokens, longer "
            f"than max_length={max_length} + 1; shorten the example or raise "
            f"--config.finetune.max_length (at most the model's context).")
    ids.append(pair[0])
    rejected_ids.append(pair[1])
    prompt_lengths.append(len(prompt))
  return Encoded(list(examples), ids, prompt_lengths, None, rejected_ids=rejected_ids)


def _row(split: Encoded, index: int, length: int, pad_id: int) -> Batch:
  """Both sequences of a pair as [length] rows (the rejected one's keys prefixed rejected_),
  their reference log-probabilities `reference` [2] (0 until `annotate`), row_weight 1."""
  prompt = split.prompt_lengths[index]
  chosen, rejected = split.ids[index], split.rejected_ids[index]
  row = data_lib.lm_row(chosen, length, pad_id, len(chosen) - prompt)
  other = data_lib.lm_row(rejected, length, pad_id, len(rejected) - prompt)
  row.update({f"rejected_{key}": value for key, value in other.items()})
  reference = np.zeros(2) if split.reference is None else split.reference[index]
  row["reference"] = np.asarray(reference, np.float32)
  row["row_weight"] = np.float32(1.0)
  return row


def _model_length(split: Encoded, index: int) -> int:
  return max(len(split.ids[index]), len(split.rejected_ids[index])) - 1


# -- Log-probabilities and the loss --------------------------------------------------------------

def response_logps(model: Transformer, params: Any, batch: Mapping[str, jax.Array],
                   rng: jax.Array | None, config: Config) -> tuple[jax.Array, jax.Array]:
  """(log-probabilities [2, batch], scored tokens [2, batch]) of the chosen (row 0) and the
  rejected (row 1) responses: one forward pass over both sequences of every pair, the head
  applied in chunks (train.loss_chunk_size) so the logits are never whole."""
  both = {key: jnp.concatenate([batch[key], batch[f"rejected_{key}"]])
          for key in SEQUENCE_KEYS}                                        # [2 x batch, length]
  hidden = apply_to_batch(model, params, both, rng, document_mask=config.train.document_mask,
                          return_hidden=True)
  head, layout = lm_head(params, model.config)

  def row_nll(hidden_row, targets_row, weights_row):  # [length, embed], [length], [length]
    nll, _ = loss_lib.cross_entropy_sums(
        hidden_row[None], head, targets_row[None], weights_row[None], layout=layout,
        chunk_size=config.train.loss_chunk_size, softcap=model.config.logit_softcap)
    return nll
  nll = jax.vmap(row_nll)(hidden, both["targets"], both["weights"])        # [2 x batch]
  rows = batch["inputs"].shape[0]
  return -nll.reshape(2, rows), jnp.sum(both["weights"], axis=1).reshape(2, rows)


def preference_loss(config: Config) -> loss_lib.LossFn:
  """The loss of finetune.preference_loss (module doc): its sum over the batch's pairs
  (weighted by row_weight: 0 on padding rows), and the sums the metrics need."""
  f = config.finetune

  def loss(model, params, batch, rng):
    logps, lengths = response_logps(model, params, batch, rng, config)     # [2, batch] each
    if f.preference_loss == "dpo":
      rewards = f.beta * (logps - batch["reference"].T)
      z = rewards[0] - rewards[1]
    else:  # simpo
      rewards = f.beta * logps / jnp.maximum(lengths, 1.0)
      z = rewards[0] - rewards[1] - f.simpo_gamma
    pair_loss = (-(1.0 - f.label_smoothing) * jax.nn.log_sigmoid(z)
                 - f.label_smoothing * jax.nn.log_sigmoid(-z))                # [batch]
    weight = batch["row_weight"]
    margin = rewards[0] - rewards[1]
    right = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    loss_sum = jnp.sum(pair_loss * weight)
    held = lambda x: jax.lax.stop_gradient(jnp.sum(x * weight))
    sums = {"loss_sum": jax.lax.stop_gradient(loss_sum), "weight_sum": jnp.sum(weight),
            "correct": held(right), "margin_sum": held(margin),
            "chosen_reward_sum": held(rewards[0]), "rejected_reward_sum": held(rewards[1]),
            "chosen_logp_sum": held(logps[0]), "rejected_logp_sum": held(logps[1])}
    if f.preference_loss == "dpo":  # the reference model's own preference: the pairs' score
      # before tuning (the rewards are then all 0)
      reference = batch["reference"]
      sums["reference_correct"] = held((reference[:, 0] > reference[:, 1]).astype(jnp.float32))
    return loss_sum, sums
  return loss


def _metrics(name: str, sums: Mapping[str, float], loss: float) -> dict[str, float]:
  del loss
  pairs = max(sums["weight_sum"], 1.0)
  out = {f"{name}_preference_accuracy": sums["correct"] / pairs,
         f"{name}_reward_margin": sums["margin_sum"] / pairs,
         f"{name}_chosen_reward": sums["chosen_reward_sum"] / pairs,
         f"{name}_rejected_reward": sums["rejected_reward_sum"] / pairs,
         f"{name}_chosen_logp": sums["chosen_logp_sum"] / pairs,
         f"{name}_rejected_logp": sums["rejected_logp_sum"] / pairs}
  if "reference_correct" in sums:  # (DPO)
    out[f"{name}_reference_preference_accuracy"] = sums["reference_correct"] / pairs
  if name == "validation":  # (the held-out accuracy under the name every run's metrics use)
    out["eval_preference_accuracy"] = out["validation_preference_accuracy"]
  return out


# -- The reference ---------------------------------------------------------------------------

def _reference_model(prepared) -> tuple[Any, Any]:
  """(model config, params on the run's mesh) of the reference: finetune.reference's run, or
  the init run's function: the policy's initial params (with fresh LoRA adapters: the same
  function) without new prefix-tuning slots (they change it from the start)."""
  from jaxlm.finetune import core  # (core imports the objectives' registry)
  config, mesh = prepared.config, prepared.mesh
  if not config.finetune.reference:
    config = config_lib.replace(
        config, model={"prefix_length": prepared.init.config.model.prefix_length})
    return config.model, core.initial_params(config, core.base_params(prepared), mesh,
                                             config.seed)
  reference = run_lib.open_run(config.finetune.reference, what="--config.finetune.reference",
                               language_model=True)
  if reference.tokenizer.serialize() != prepared.tokenizer.serialize():
    raise FinetuneError(f"finetune.reference={config.finetune.reference}: its tokenizer is not "
                        f"the --init run's; the reference must score the same token ids.")
  params = run_lib.restore_params(reference, mesh)
  return reference.config.model, params


def annotate(prepared) -> None:
  """Fills every split's `reference` [examples, 2] with the reference model's log-probabilities
  of the chosen and rejected responses (DPO; SimPO has no reference), in batches of the run's
  global batch size."""
  config, mesh = prepared.config, prepared.mesh
  if config.finetune.preference_loss != "dpo":
    return
  model_config, params = _reference_model(prepared)
  reference_config = dataclasses.replace(config, model=model_config)

  def scores(model, params, batch, rng):
    logps, _ = response_logps(model, params, batch, None, reference_config)
    return jnp.float32(0.0), {"logps": logps.T}                          # [batch, 2]
  step = steps_lib.make_eval_step(model_config, mesh, scores)
  size = config.train.global_batch_size
  for split in prepared.splits.values():
    found = [np.asarray(jax.device_get(step(params, sharding.global_batch(
        sharding.local_rows(batch, mesh), mesh)))["logps"])
             for batch in batches(split, size, prepared.max_length, prepared.tokenizer.pad_id,
                                  prepared.objective)]
    split.reference = np.concatenate(found)[:len(split.ids)].astype(np.float32)


# -- The objective ---------------------------------------------------------------------------

def _read(path: str, f: FinetuneConfig, tokenizer, flag: str) -> list[Example]:
  return instruct.read_templated(read_preferences, path, f, tokenizer, flag)


def _check(config: Config) -> None:
  f = config.finetune
  if f.balance:
    raise FinetuneError("finetune.balance undersamples the classes of classifier data; "
                        "preference pairs have none: drop it.")
  if f.reference and f.preference_loss != "dpo":
    raise FinetuneError(f"finetune.reference is DPO's reference model; "
                        f"preference_loss={f.preference_loss!r} has none: drop one of the two.")


OBJECTIVE = register(Objective(
    name="preference", read=_read, classes=lambda examples, path: [],
    encode=lambda examples, tokenizer, classes, max_length: encode_preferences(
        examples, tokenizer, max_length),
    row=_row, model_length=_model_length, loss=preference_loss, metrics=_metrics,
    rank=lambda r: (r["validation_preference_accuracy"], -r["validation_loss"]),
    can_sample=True, check=_check, finish=instruct.answer_test_prompts, annotate=annotate))
