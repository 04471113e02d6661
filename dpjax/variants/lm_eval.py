"""An lm-evaluation-harness backend: `--model dpjax` evaluates a pruned variant on any task.

    dpjax-lm-eval run --model dpjax --model_args 'pretrained=PATH,keep=0-3;5;9' --tasks arc_easy
    python -m dpjax.variants.lm_eval run --model dpjax --model_args plan=dpjax_pruned ...

    import lm_eval, dpjax.variants.lm_eval   # the import registers the backend
    lm_eval.simple_evaluate(model="dpjax", model_args="pretrained=PATH,keep=0;1;5", tasks=[...])

lm-eval 0.4 finds its backends in its own table (`lm_eval.models.MODEL_MAPPING`) and
has no plugin entry point, so the backend is reached two ways: importing this module
registers it (`lm_eval.api.registry.register_model("dpjax")`) for the Python API, and
`dpjax-lm-eval` (or `python -m dpjax.variants.lm_eval`) registers it and then runs
lm-eval's own command line with the same arguments, so every flag of `lm_eval` works.

model_args:

* `pretrained=`: an HF directory, a GGUF file or a converted dpjax checkpoint
  (`dpjax.load_model`); default the bundled model.
* `keep=`: the kept blocks, 0-based, separated by `;` with `a-b` ranges (`keep=0-3;5;9`).
  lm-eval cuts model_args at every comma, so a comma-separated list does not survive
  its parsing (it is refused with this advice); quote the argument in the shell, where
  `;` ends a command. A bracketed list (`keep=[0,1,5]`, lm-eval's CLI keeps brackets
  whole) and, in the Python API, a list of ints are taken too.
* `plan=`: a `pruning_plan.json` written by `dpjax-prune` (or its directory): its kept
  blocks and its source model (`pretrained=` overrides the source).
* `dtype=` (`float32`, `bfloat16`, `float16`; default the checkpoint's),
  `max_length=` (default the model's `max_position_embeddings`), `add_bos_token=`,
  `max_gen_toks=` (default 256, as lm-eval's HF backend); the batch size is lm-eval's
  `--batch_size` (rows of packed sequences per call, or `auto`: about
  `AUTO_TOKENS` tokens a call).

How it computes (the same numbers as lm-eval's HF backend, tested to 1e-4):

* `loglikelihood`: requests are tokenized as lm-eval's HF backend does
  (`TemplateLM._encode_pair`, left truncation to `max_length + 1` tokens). Requests
  with the same context are packed as dpjax's cloze format packs an item's options
  (`dpjax.tasks.encoding`): the context once, then each continuation in a segment of
  its own whose positions restart where the context ends, attending to the context
  and to itself only. Only the positions that predict a continuation token go
  through the last block and the unembedding (`Transformer.run_blocks(rows=)`), in
  chunks, so `[B, T, V]` logits are never formed. Rows are padded to shape buckets
  (lengths in steps of x1.5 / x2), so one compiled program serves each bucket.
* `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens,
  scored as above and summed per document.
* `generate_until`: greedy decoding with dpjax's KV-cache server (`dpjax.serve.Server`,
  only the kept blocks run), in rounds of growing length (16, 16, 32, 64 ... up to
  `max_gen_toks`) that stop once every row has met an end-of-sequence token or a stop
  string; the text is cut at the end of sequence and at the first stop string
  (`until` from the request, plus the end-of-sequence text, as lm-eval does).
  Sampling is refused: the server decodes greedily.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any, Sequence

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api import registry as lm_registry
  from lm_eval.api.model import TemplateLM
except ImportError as e:  # pragma: no cover - the message is the point
  raise ImportError("dpjax's lm-eval backend needs lm-evaluation-harness: pip install "
                    "'dpjax[lm_eval]' (or pip install 'lm_eval>=0.4.8').") from e

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

NAME = "dpjax"
# `batch_size=auto`: rows per call such that a call holds about this many tokens.
AUTO_TOKENS = 8192
# Logits formed at once when reading log-probabilities: `[rows, V]` float32 of this size.
LOGITS_BYTES = 64 << 20
DEFAULT_MAX_GEN_TOKS = 256
FIRST_ROUND = 16  # tokens generated before the first check for stop strings

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# model_args


def parse_keep(value, num_layers: int) -> list[int] | None:
  """The kept blocks of a `keep=` model argument (None: every block).

  Accepts an int, a list of ints, or a string of blocks and `a-b` ranges (inclusive)
  separated by `;` (or by commas or spaces, where the value reached here whole: a
  Python dict of model_args, a quoted value)."""
  if value is None or value == "":
    return None
  if isinstance(value, bool):
    raise ValueError(f"keep={value!r} is not a list of blocks.")
  if isinstance(value, int):
    items: list[Any] = [value]
  elif isinstance(value, (list, tuple)):
    items = list(value)
  elif isinstance(value, str):
    text = value.strip().strip("[]()")
    items = [part for part in text.replace(",", ";").replace(" ", ";").split(";") if part]
  else:
    raise ValueError(f"keep={value!r}: give the kept blocks as '0-3;5;9' or a list of ints.")
  kept = []
  for item in items:
    if isinstance(item, str) and "-" in item.strip()[1:]:
      lo, hi = item.strip().split("-", 1)
      try:
        lo, hi = int(lo), int(hi)
      except ValueError:
        raise ValueError(f"keep: {item!r} is not a block range like '0-3'.") from None
      if hi < lo:
        raise ValueError(f"keep: the range {item!r} is empty (write the lower block first).")
      kept.extend(range(lo, hi + 1))
      continue
    try:
      kept.append(int(item))
    except (TypeError, ValueError):
      raise ValueError(f"keep: {item!r} is not a block index (keep=0-3;5;9 keeps blocks "
                       "0, 1, 2, 3, 5 and 9).") from None
  from dpjax.model.plan import KeepPlan
  return list(KeepPlan.from_kept(kept, num_layers).kept)  # checked: range, repeats, empty


def read_plan(path: str) -> tuple[str, list[int], dict]:
  """The source model and kept blocks of a `pruning_plan.json` (or of its directory), and
  the plan itself. A relative source is found from the working directory or the plan's."""
  from dpjax.variants.budget import PLAN_FILE
  if os.path.isdir(path):
    path = os.path.join(path, PLAN_FILE)
  try:
    with open(path) as f:
      plan = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"plan={path}: cannot read a pruning plan ({type(e).__name__}: {e}).") \
        from e
  try:
    source, kept = plan["source"]["model"], [int(b) for b in plan["kept_blocks"]]
  except (KeyError, TypeError) as e:
    raise ValueError(f"plan={path} is not a pruning_plan.json written by dpjax-prune (it "
                     "has no source.model and kept_blocks).") from e
  if not os.path.isabs(source) and not os.path.exists(source):
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), source)
    source = beside if os.path.exists(beside) else source
  return source, kept, plan


# Arguments lm-eval passes every backend (or users carry over from the HF backend) that
# mean nothing here: JAX places the model on its own devices.
_IGNORED = ("device", "max_batch_size", "trust_remote_code", "parallelize", "revision")


def _eos_ids(source: str, tokenizer) -> set[int]:
  """End-of-sequence ids: the tokenizer's, and the model's generation config's (what HF
  `generate` stops at), read from the checkpoint directory where it has one."""
  ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  if os.path.isdir(source):
    for name in ("generation_config.json", "config.json", "hf_config.json"):
      try:
        with open(os.path.join(source, name)) as f:
          value = json.load(f).get("eos_token_id")
      except (OSError, json.JSONDecodeError):
        continue
      if value is not None:
        ids.update(value if isinstance(value, list) else [value])
        break
  return {int(i) for i in ids}


def generation_settings(gen_kwargs: dict | None, default_max_gen_toks: int
                        ) -> tuple[list[str], int]:
  """A generation request's stop strings and token budget, read as lm-eval's HF backend
  reads them (`until`: a string or a list; the budget from `max_gen_toks`, else
  `max_new_tokens`, `max_tokens`, `max_completion_tokens`). Sampling (`do_sample=True`, or
  a temperature above 0 without `do_sample`) is refused: the server decodes greedily."""
  kwargs = dict(gen_kwargs or {})
  until = kwargs.get("until")
  if until is None:
    until = []
  elif isinstance(until, str):
    until = [until]
  elif isinstance(until, (list, tuple)):
    until = list(until)
  else:
    raise ValueError(f"gen_kwargs until={until!r}: give a string or a list of strings.")
  budget = default_max_gen_toks
  for name in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
    if kwargs.get(name) is not None:
      budget = int(kwargs[name])
      break
  sample, temperature = kwargs.get("do_sample"), float(kwargs.get("temperature") or 0.0)
  if sample or (sample is None and temperature > 0.0):
    raise ValueError(f"the dpjax backend decodes greedily; this task asks for sampling "
                     f"(do_sample={sample}, temperature={temperature}). Run it with "
                     "--gen_kwargs do_sample=False.")
  if budget < 1:
    raise ValueError(f"max_gen_toks={budget}; generate at least 1 token.")
  return until, budget


def cut_at_stops(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any (non-empty) stop string."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


# ----------------------------------------------------------------------------
# Packing (context, continuation) token pairs


def bucket(n: int, minimum: int = 16) -> int:
  """The shape bucket that holds `n`: the smallest of `minimum` x {1, 1.5, 2, 3, 4, 6, ...}
  at least `n` (padding wastes at most a third; few shapes are compiled)."""
  size = minimum
  while True:
    if size >= n:
      return size
    if size % 2 == 0 and size * 3 // 2 >= n:
      return size * 3 // 2
    size *= 2


@dataclasses.dataclass
class PackedRow:
  """One packed sequence: a context once, then continuations in segments of their own.

  `reads`: (packed index, target token, pair) for each continuation token: the position
  whose next-token distribution scores it, and which (context, continuation) pair it
  belongs to."""
  tokens: list[int]
  positions: list[int]
  segments: list[int]
  reads: list[tuple[int, int, int]]


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], row_limit: int
         ) -> list[PackedRow]:
  """Pairs `(context, continuation)` with the same context, packed into rows of at most
  `row_limit` tokens (a pair alone always fits: the context and all but the last
  continuation token). A continuation token `j` is read at continuation token `j - 1`
  (the first at the context's last token), in its own segment, so that it sees the
  context and its own earlier tokens only, at the positions it has alone."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, (context, _) in enumerate(pairs):
    groups.setdefault(tuple(context), []).append(i)
  rows: list[PackedRow] = []
  for context, members in groups.items():
    n = len(context)
    row = None
    for i in members:
      continuation = list(pairs[i][1])
      if row is None or len(row.tokens) + len(continuation) - 1 > row_limit:
        row = PackedRow(list(context), list(range(n)), [0] * n, [])
        rows.append(row)
      segment = max(row.segments) + 1
      at = n - 1
      for j, token in enumerate(continuation):
        row.reads.append((at, token, i))
        if j < len(continuation) - 1:
          row.tokens.append(token)
          row.positions.append(n + j)
          row.segments.append(segment)
          at = len(row.tokens) - 1
  return rows


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score(state, input_ids, attention_mask, positions, segments, read_index, read_target,
           block_index, block_valid, *, graphdef, chunk: int):
  """Log-probability of `read_target` `[B, R]` at packed positions `read_index`, and
  whether it is the argmax there. Only the read positions run the last block and the
  unembedding, `chunk` rows of `[V]` logits at a time."""
  module = nnx.merge(graphdef, state)
  h, _, _ = module.run_blocks(input_ids, attention_mask, block_index, block_valid,
                              positions=positions, segments=segments, rows=read_index)
  b, r, d = h.shape

  def one(args):
    x, target = args
    logits = module.unembed(x).astype(jnp.float32)  # [V]
    logp = logits[target] - jax.nn.logsumexp(logits)
    return logp, jnp.argmax(logits) == target

  logp, greedy = jax.lax.map(one, (h.reshape(b * r, d), read_target.reshape(b * r)),
                             batch_size=min(chunk, b * r))
  return logp.reshape(b, r), greedy.reshape(b, r)


# ----------------------------------------------------------------------------
# The backend


class DpjaxLM(TemplateLM):
  """A dpjax model, pruned to its kept blocks, as an lm-eval language model (see the
  module docstring for the model_args and how each request type is computed)."""

  def __init__(self, pretrained: str | None = None, keep=None, plan: str | None = None,
               dtype: str | None = None, compute_dtype: str | None = None,
               batch_size: int | str | None = None, max_length: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
               **kwargs):
    super().__init__()
    split = sorted(k for k, v in kwargs.items() if v in ("", None) and
                   str(k).replace("-", "").isdigit())
    if split:
      raise ValueError(f"model_args has arguments {split} with no value: lm-eval cut a "
                       "comma-separated keep= list at its commas. Separate the kept blocks "
                       "with ';' (keep=0;1;5, quoted in the shell) or give ranges (keep=0-3).")
    unknown = sorted(set(kwargs) - set(_IGNORED))
    if unknown:
      raise ValueError(f"the dpjax backend takes no model_args {unknown}; it takes "
                       "pretrained, keep, plan, dtype, compute_dtype, max_length, "
                       "max_gen_toks and add_bos_token.")
    import dpjax
    from dpjax.bundled import BUNDLED_MODEL
    from dpjax.checkpoints.convert import load_tokenizer
    self.plan = None
    if plan:
      if keep not in (None, ""):
        raise ValueError("give keep= or plan=, not both (the plan names its kept blocks).")
      source, keep, self.plan = read_plan(str(plan))
      pretrained = pretrained or source
    if dtype in ("auto", ""):
      dtype = None
    self.model = dpjax.load_model(str(pretrained or BUNDLED_MODEL), dtype=dtype,
                                  compute_dtype=compute_dtype)
    self.kept = parse_keep(keep, self.model.num_layers) or list(range(self.model.num_layers))
    if self.plan is not None:
      self._check_plan(self.plan, dtype)
    from dpjax.model.plan import KeepPlan
    from dpjax.serve import Server
    self.keep_plan = KeepPlan.from_kept(self.kept, self.model.num_layers)
    self.block_index, self.block_valid = self.keep_plan.steps()
    self.server = Server(self.model, self.keep_plan.mask)
    self.tokenizer = load_tokenizer(self.model.source)
    self.add_bos_token = add_bos_token
    self._eos = _eos_ids(self.model.source, self.tokenizer)
    limit = self.model.config.max_position_embeddings
    self._max_length = int(max_length) if max_length else limit
    if not 1 < self._max_length <= limit:
      raise ValueError(f"max_length={max_length}: give at most the model's "
                       f"max_position_embeddings={limit} tokens.")
    self._max_gen_toks = int(max_gen_toks)
    self._batch_size = self._parse_batch_size(batch_size)
    logger.info("dpjax backend: %s, %d of %d blocks kept %s", self.model.source,
                len(self.kept), self.model.num_layers, self.kept)

  def _check_plan(self, plan: dict, dtype: str | None) -> None:
    """A plan of another model (by block count, or by weights when no dtype was asked
    for) is refused or flagged before any request runs."""
    layers = plan["source"].get("num_layers")
    if layers is not None and int(layers) != self.model.num_layers:
      raise ValueError(f"the plan prunes a {layers}-block model; {self.model.source} has "
                       f"{self.model.num_layers} blocks.")
    want = plan["source"].get("fingerprint")
    if want and dtype is None:
      from dpjax.lens.tuned import fingerprint
      if fingerprint(self.model) != want:
        logger.warning("the weights of %s differ from the plan's source (its fingerprint): "
                       "another model, or the same one in another dtype.", self.model.source)

  @staticmethod
  def _parse_batch_size(value) -> int | None:
    """Rows a call (None: `auto`, by tokens)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
      return None
    try:
      size = int(value)
    except (TypeError, ValueError):
      raise ValueError(f"batch_size={value!r}: give an integer or 'auto'.") from None
    if size < 1:
      raise ValueError(f"batch_size={size}; give at least 1.")
    return size

  # --- what lm-eval asks of a model -----------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    """The token an empty context (and the first rolling window) conditions on: BOS, else
    EOS, as lm-eval's HF backend."""
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int | str:
    return "auto" if self._batch_size is None else self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return str(self.tokenizer.name_or_path).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """As lm-eval's HF backend: the tokenizer's own special tokens unless told
    (`add_special_tokens`, else `add_bos_token`), none when the text starts with BOS."""
    special = {}
    if add_special_tokens is not None:
      special["add_special_tokens"] = add_special_tokens
    elif self.add_bos_token is not None:
      special["add_special_tokens"] = self.add_bos_token
    if add_special_tokens is None and string.startswith(
        self.tokenizer.decode(self.prefix_token_id)):
      special["add_special_tokens"] = False
    ids = self.tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(
        chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt)

  def get_model_info(self) -> dict:
    """What lm-eval records of the model in its results' config."""
    return {"dpjax_source": str(self.model.source), "dpjax_num_layers": self.model.num_layers,
            "dpjax_kept_blocks": list(self.kept),
            "dpjax_param_dtype": self.model.config.param_dtype}

  # --- log-likelihoods -------------------------------------------------------

  def _rows_per_call(self, length: int, total: int) -> int:
    """Rows of a call of `length`-token rows: `batch_size`, or by tokens (`auto`); fewer
    (bucketed) only when the whole job has fewer rows, so that the last call of a job
    compiles nothing new (filler rows pad it)."""
    rows = self._batch_size or max(1, AUTO_TOKENS // length)
    return min(rows, bucket(total, 1))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """`[(strings, context tokens, continuation tokens)]` -> `[(log-likelihood, is_greedy)]`.

    Truncation as lm-eval's HF backend: context + continuation keep their last
    `max_length + 1` tokens (the last is never input). Identical pairs are computed once.
    """
    length = self.max_length
    pairs, index, which = [], {}, []
    for _, context, continuation in requests:
      context, continuation = list(context), list(continuation)
      if not context or not continuation:
        raise ValueError("a log-likelihood request needs a context and a continuation "
                         "token (lm-eval gives an empty context the prefix token).")
      if len(continuation) > length:
        raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                         f"max_length={length}.")
      context = context[-(length + 1 - len(continuation)):]
      key = (tuple(context), tuple(continuation))
      if key not in index:
        index[key] = len(pairs)
        pairs.append(key)
      which.append(index[key])
    logp = np.zeros(len(pairs), np.float64)
    greedy = np.ones(len(pairs), bool)
    rows = sorted(pack(pairs, length), key=lambda row: -len(row.tokens))
    chunk = max(1, LOGITS_BYTES // (4 * self.model.config.vocab_size))
    bar = tqdm(total=len(rows), disable=disable_tqdm, desc="dpjax loglikelihood (packed rows)")
    start = 0
    while start < len(rows):
      width = bucket(len(rows[start].tokens))
      count = self._rows_per_call(width, len(rows))
      batch = rows[start:start + count]
      start += len(batch)
      reads = bucket(max(len(row.reads) for row in batch))
      ids = np.zeros((count, width), np.int32)
      mask = np.zeros((count, width), np.int32)
      positions = np.zeros((count, width), np.int32)
      segments = np.full((count, width), -1, np.int32)
      read_index = np.zeros((count, reads), np.int32)
      read_target = np.zeros((count, reads), np.int32)
      mask[:, 0] = 1  # filler rows hold one token
      for r, row in enumerate(batch):
        n = len(row.tokens)
        ids[r, :n], mask[r, :n] = row.tokens, 1
        positions[r, :n], segments[r, :n] = row.positions, row.segments
        at = np.array([(i, t) for i, t, _ in row.reads], np.int32)
        read_index[r, :len(at)], read_target[r, :len(at)] = at[:, 0], at[:, 1]
      got_logp, got_greedy = _score(
          self.model.state, ids, mask, positions, segments, read_index, read_target,
          self.block_index, self.block_valid, graphdef=self.model.graphdef, chunk=chunk)
      got_logp, got_greedy = np.asarray(got_logp), np.asarray(got_greedy)
      for r, row in enumerate(batch):
        for j, (_, _, pair) in enumerate(row.reads):
          logp[pair] += float(got_logp[r, j])
          greedy[pair] &= bool(got_greedy[r, j])
      bar.update(len(batch))
    bar.close()
    out = []
    for (strings, _, _), pair in zip(requests, which):
      answer = (float(logp[pair]), bool(greedy[pair]))
      if strings is not None:
        self.cache_hook.add_partial("loglikelihood", strings, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The log-likelihood of each whole text: lm-eval's disjoint windows of `max_length`
    tokens (the first conditioned on the prefix token), scored together, summed per
    text."""
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                        lm_utils.get_rolling_token_windows(
                                            token_list=self.tok_encode(text),
                                            prefix_token=self.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # --- generation ------------------------------------------------------------

  def _context_tokens(self, text: str, limit: int) -> list[int]:
    """A generation prompt as lm-eval's HF backend encodes a batch of them (BOS by the
    tokenizer's default unless the text starts with it or `add_bos_token` says), its
    last `limit` tokens."""
    special = {}
    bos = getattr(self.tokenizer, "bos_token", None)
    if bos is not None and text.startswith(bos):
      special["add_special_tokens"] = False
    elif self.add_bos_token is not None:
      special["add_special_tokens"] = self.add_bos_token
    return self.tokenizer(text, **special)["input_ids"][-limit:]

  def _finished(self, tokens: list[int], until: list[str]) -> bool:
    if any(t in self._eos for t in tokens):
      return True
    text = self.tok_decode(tokens)
    return any(stop and stop in text for stop in until)

  def _cut(self, tokens: list[int]) -> list[int]:
    """The tokens before the first end of sequence (what HF `generate` keeps: it stops a
    row there and pads it)."""
    for i, token in enumerate(tokens):
      if token in self._eos:
        return tokens[:i]
    return tokens

  def _generate_group(self, prompts: list[list[int]], until: list[str], max_gen_toks: int
                      ) -> list[list[int]]:
    """Greedy continuations (at most `max_gen_toks` tokens, cut at end of sequence) of
    `prompts`, a call of `batch_size` rows at a time, in rounds until every row of the
    call has finished."""
    limit = self.model.config.max_position_embeddings
    out: list[list[int]] = []
    start = 0
    while start < len(prompts):
      width = bucket(len(prompts[start]) + max_gen_toks)
      count = self._rows_per_call(width, len(prompts))
      group = prompts[start:start + count]
      start += len(group)
      made = [[] for _ in group]
      while True:
        step = min(max_gen_toks - len(made[0]), max(FIRST_ROUND, len(made[0])))
        texts = [p + m for p, m in zip(group, made)]
        width = min(bucket(max(len(t) for t in texts)), limit - step)
        ids = np.zeros((count, width), np.int32)
        mask = np.zeros((count, width), np.int32)
        for r in range(count):
          row = texts[min(r, len(texts) - 1)]  # filler rows repeat the last prompt
          ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
        tokens = np.asarray(self.server.generate(ids, mask, max_new_tokens=step))
        for r in range(len(group)):
          made[r] += [int(t) for t in tokens[r]]
        if len(made[0]) >= max_gen_toks or all(self._finished(m, until) for m in made):
          break
      out.extend(self._cut(m) for m in made)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy generation until a stop string, end of sequence or `max_gen_toks` tokens
    (`until` and `max_gen_toks` from each request's gen_kwargs), requests with the same
    gen_kwargs batched together, longest prompt first."""
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dpjax generate_until")
    for members in groups.values():
      until, max_gen_toks = generation_settings(requests[members[0]].args[1], self.max_gen_toks)
      if eos_text and eos_text not in until:
        until.append(eos_text)  # as lm-eval's HF backend
      if max_gen_toks >= self.max_length:
        raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt within "
                         f"max_length={self.max_length}.")
      prompts = [self._context_tokens(requests[i].args[0], self.max_length - max_gen_toks)
                 for i in members]
      order = sorted(range(len(members)), key=lambda j: -len(prompts[j]))
      made = self._generate_group([prompts[j] for j in order], until, max_gen_toks)
      for j, tokens in zip(order, made):
        i = members[j]
        text = cut_at_stops(self.tok_decode(tokens), until)
        results[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(1)
    bar.close()
    return results


def register() -> None:
  """Registers `DpjaxLM` as lm-eval's `dpjax` model, once (importing this module does it).

  Recent lm-eval (0.4.13) fills its registry lazily from `lm_eval.models`, and only when
  it is empty, so lm-eval's own backends are placed there first; older releases
  register every backend when `lm_eval.models` is imported (torch with them), which
  their evaluator does itself."""
  if hasattr(lm_registry, "model_registry"):
    import lm_eval.models  # noqa: F401
  try:
    if lm_registry.get_model(NAME) is DpjaxLM:
      return
  except ValueError:
    pass
  lm_registry.register_model(NAME)(DpjaxLM)


def main(argv: Sequence[str] | None = None) -> None:
  """`dpjax-lm-eval`: lm-eval's own command line (`lm_eval run ...`, `ls`, `validate`) with
  the `dpjax` model registered; `argv` (default: the process's) as `lm_eval` takes them."""
  register()
  from lm_eval.__main__ import cli_evaluate
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  # Run as a script this file is `__main__`; the backend lives in the module under its
  # own name, which registers it once.
  from dpjax.variants.lm_eval import main as _main
  _main()
else:
  register()
