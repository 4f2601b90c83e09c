"""SPIN, self-play fine-tuning (NeMo-Aligner's ``gpt_spin.yaml``): DPO between the chat data's own
replies and the model's.

Iteration k = 1 .. ``spin.iterations``:
  1. the model as it starts the iteration (the config's model, then iteration k-1's result) answers
     the prompt of every chat record, the conversation up to its last assistant turn, through the
     rollout engine of ``rollout.engine`` given its weights (local, or a served one refitted);
  2. each (recorded reply, generated reply) becomes a comparison pair, written to
     ``<run_dir>/iteration_<k>/train_pairs.jsonl`` (and ``val_pairs.jsonl`` for ``data.validation``);
  3. DPO trains on those pairs for ``spin.epochs`` epochs with the starting model as its reference
     (``dpo.beta`` is NeMo's ``ref_policy_kl_penalty``; ``dpo.loss_type`` applies too).
Iteration k is an ordinary DPO run folder, so ``run:<run_dir>/iteration_<k>`` starts any later job from
it; ``<run_dir>/spin.json`` lists the iterations done. A rerun skips finished iterations and resumes an
unfinished one on the pairs it generated before.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
from flax import nnx

from jalign import config as config_lib
from jalign import run_folder, specs
from jalign.data import formats
from jalign.data.chat import NemoChatFormat
from jalign.data.preference import render_prompt
from jalign.data.tokenizer import Tokenizer
from jalign.models import lora
from jalign.parallel import mesh as pmesh
from jalign.recipes import build, rollouts
from jalign.rollout import engine as engine_lib
from jalign.rollout.sampling import Request
from jalign.specs.base import RolloutSettings, message_format

_ROLES = {"User": "user", "Assistant": "assistant"}


def prompts_and_replies(records: list[dict]) -> tuple[list[list[dict]], list[str], int]:
  """``(prompts, replies, skipped)`` of parsed chat records: each record's messages before its last
  assistant turn, and that turn's text. Records without such a turn, or with nothing before it, are
  skipped (counted)."""
  prompts, replies, skipped = [], [], 0
  for rec in records:
    turns = rec["conversations"]
    last = max((i for i, t in enumerate(turns) if t["from"] == "Assistant"), default=None)
    messages = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    messages += [{"role": _ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in turns[:last or 0]]
    if last is None or not any(m["role"] != "system" for m in messages):
      skipped += 1
      continue
    prompts.append(messages)
    replies.append(turns[last]["value"])
  return prompts, replies, skipped


def generate_replies(engine, tok: Tokenizer, prompts: list[list[dict]], chat_format: NemoChatFormat,
                     s: RolloutSettings, *, max_seq_length: int, seed: int) -> tuple[list[str], dict]:
  """The reply text of the rollout ``engine``'s weights to each message prompt, sampled as ``s`` says
  (``s.micro_batch`` rows at a time), and generation statistics.

  A reply stops at the chat format's next turn start (or EOS); the end-of-turn text before it is cut,
  since the pair encoder adds it back. Prompts lose tokens from the left to leave room for the reply.
  """
  max_new = s.max_new_tokens or max_seq_length // 2
  stops = [i for i in (_single_id(tok, chat_format.turn_start), tok.eos_id) if i is not None]
  keep = max_seq_length - max_new
  ids = [tok.encode(render_prompt(p, chat_format)[0], add_special_tokens=False)[-keep:] for p in prompts]
  request = Request(max_new_tokens=max_new, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, greedy=s.greedy,
                    stop_ids=tuple(stops), pad_id=tok.pad_id if tok.pad_id is not None else 0, seed=seed,
                    prompt_width=max(len(x) for x in ids), rows=s.micro_batch)
  out = engine.generate(ids, request)
  texts, lengths = [], []
  for reply, ended in zip(out.responses, out.is_end):
    reply = reply[:-1] if ended else reply  # the stop token
    text = tok.decode(reply)
    if text.endswith(chat_format.end_of_turn):
      text = text[:len(text) - len(chat_format.end_of_turn)]
    texts.append(text)
    lengths.append(len(reply))
  return texts, {"generated": len(texts), "mean_reply_tokens": float(np.mean(lengths)),
                 "ended": float(np.mean(out.is_end))}


def _single_id(tok: Tokenizer, text: str) -> int | None:
  ids = tok.encode(text, add_special_tokens=False)
  return ids[0] if len(ids) == 1 else None


def write_pairs(path: Path, prompts, replies, generated) -> dict:
  """The comparison records (recorded reply chosen, generated one rejected); empty generations, which a
  comparison file cannot hold, are left out and counted."""
  records = [{"prompt": p, "chosen_response": r, "rejected_response": g}
             for p, r, g in zip(prompts, replies, generated) if g.strip()]
  formats.write_jsonl(path, records)
  return {"pairs": len(records), "empty_generations": len(prompts) - len(records)}


def as_dpo(c):
  """A copy of SPIN config ``c`` as the DPO config of its training steps (one pair per row)."""
  ci = copy.deepcopy(c)
  ci.algorithm = "dpo"
  ci.data.format = "comparison"
  ci.data.pack = False  # so that an epoch is pairs / global_batch_size steps
  return ci


def iteration_config(c, k: int, folder: Path, pairs: int, previous: Path | None, has_validation: bool):
  """The DPO run config of iteration ``k``."""
  ci = as_dpo(c)
  ci.run_dir = str(folder)
  ci.data.train = str(folder / "train_pairs.jsonl")
  ci.data.validation = str(folder / "val_pairs.jsonl") if has_validation else ""
  ci.model.init = f"run:{previous}" if previous is not None else c.model.init
  ci.train.max_steps = max(1, math.ceil(c.spin.epochs * pairs / c.train.global_batch_size))
  return ci


def _load_records(c, spec: str, log) -> list[dict]:
  path = config_lib.data_path(spec)
  records, report = formats.read_jsonl(path, c.data.format, skip_bad_lines=c.data.skip_bad_lines)
  log(f"{path}: {report.records} records, {report.bad_lines} bad lines skipped")
  return records


def run(c, log=print) -> dict:
  """Every SPIN iteration of config ``c``; returns ``{"iterations": [...], "steps", "stopped", ...}``."""
  _, _, run_dir = build.prepare_run(c)
  summary_path = run_dir / "spin.json"
  done = json.loads(summary_path.read_text())["iterations"] if summary_path.is_file() else []

  chat_format, sampling = message_format(c), specs.sampling_settings(c)
  data = {"train": prompts_and_replies(_load_records(c, c.data.train, log))}
  if c.data.validation:
    data["val"] = prompts_and_replies(_load_records(c, c.data.validation, log))
  if len(data["train"][0]) < c.train.global_batch_size:
    raise formats.DataError(f"{config_lib.data_path(c.data.train)}: {len(data['train'][0])} prompts with an "
                            f"assistant reply, fewer than config.train.global_batch_size {c.train.global_batch_size}")
  run_folder.record_config(c, log=log)

  model = tok = None
  previous = None
  results = list(done)
  stopped, steps = "finished", 0
  for k in range(1, c.spin.iterations + 1):
    folder = run_dir / f"iteration_{k}"
    if k <= len(done):  # finished before: its result is where the next iteration starts
      previous, model = folder, None
      continue
    if model is None:
      model, tok = _starting_model(c, previous)
    folder.mkdir(parents=True, exist_ok=True)
    stats_path = folder / "pairs.json"
    if stats_path.is_file():  # resume on the pairs generated before
      stats = json.loads(stats_path.read_text())
    else:
      stats = {}
      engine = _engine(c, model, k, sampling, log)
      for split, (prompts, replies, skipped) in data.items():
        generated, gen_stats = generate_replies(engine, tok, prompts, chat_format, sampling,
                                                max_seq_length=c.data.max_seq_length, seed=c.seed + 1000 * k)
        written = write_pairs(folder / f"{split}_pairs.jsonl", prompts, replies, generated)
        stats[split] = {"records_without_reply": skipped, **gen_stats, **written}
      del engine  # its copy of the weights need not stay while the iteration trains
      stats_path.write_text(json.dumps(stats, indent=2))
    log(f"iteration {k}: " + ", ".join(f"{split} {s['pairs']} pairs ({s['mean_reply_tokens']:.1f} tokens a reply, "
                                       f"{s['ended']:.0%} ended)" for split, s in stats.items()))
    ci = iteration_config(c, k, folder, stats["train"]["pairs"], previous, stats.get("val", {}).get("pairs", 0) > 0)
    loop = build.build_trainer(ci, log, model=model, tokenizer=tok)
    result = loop.run()
    steps += result["steps"]
    if result["stopped"] != "finished":  # SIGTERM or the time limit: a rerun resumes this iteration
      stopped = result["stopped"]
      break
    model = nnx.merge(loop.graphdef, loop.state.params, loop.state.rest)
    model = lora.merge_lora(model) if lora.has_lora(model) else model
    results.append({"iteration": k, "run_dir": str(folder), "steps": result["steps"], "pairs": stats,
                    "first_loss": loop.losses.get(1), "last_loss": loop.losses.get(result["steps"]),
                    "val": result["val"]})
    summary_path.write_text(json.dumps({"iterations": results}, indent=2))
    previous = folder
    del loop  # its optimizer state need not stay on the devices while the next iteration generates
  log(f"SPIN {stopped}: {len(results)} of {c.spin.iterations} iterations; run folder: {run_dir.absolute()}")
  return {"iterations": results, "steps": steps, "stopped": stopped, "run_dir": str(run_dir)}


def _engine(c, model, version: int, sampling: RolloutSettings, log):
  """The rollout engine of ``config.rollout.engine`` given ``model``'s weights as ``version``."""
  rules = build.rules_of(c)
  graphdef, state = nnx.split(model)
  engine = rollouts.ENGINES[c.rollout.engine](c, graphdef, pmesh.make_mesh(dict(c.mesh)), rules,
                                              engine_lib.generation_rules(sampling, rules), log=log)
  engine.update_weights(version, (state,))
  return engine


def _starting_model(c, previous: Path | None):
  """The model an iteration starts from: the config's, or a finished iteration's (after a rerun), placed
  on the config's mesh as it is read."""
  mesh = pmesh.make_mesh(dict(c.mesh))
  if previous is None:
    model, own = build.build_model(c, mesh)
    return model, build.build_tokenizer(c, own)
  model, tok, _ = build.load_trained(previous, mesh=mesh, rules=build.rules_of(c))
  return (lora.merge_lora(model) if lora.has_lora(model) else model), tok
