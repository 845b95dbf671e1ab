"""The teacher actor pool: packed token blocks in, teacher-summary columns out (DESIGN §1, §3).

``TeacherScorer`` is a callable class for ``Dataset.map_batches`` with an ``ActorPoolStrategy``: each actor
loads the teacher once and scores batches of packed blocks ``input_ids [B, T+1]``. It runs the teacher on
``input_ids[:, :-1]``, so summary position t is the teacher's distribution p(· | x_0..x_t) over the
student's next-token target x_{t+1}. It runs only the teacher's decoder and summarises its final hidden
states through the LM head chunk by chunk (``summarize_hidden``), never holding [B·T, V] logits, unless a
start-up probe finds the model's logits are not its LM head's (then from full logits, with a warning).
Tail samples are drawn with one generator per block, seeded from (``train.seed``, the block's content
hash): a block gets the same samples whichever actor scores it and however batches are formed, so
re-scoring after a failure reproduces the same rows (on one device type; CPU and CUDA samplers differ).

``score_dataset`` wires the pool into a Ray Data pipeline, after the start-up checks (one vocabulary,
``models.check_vocab_compatible``; blocks within the teacher's context window; a cluster that can host the pool).
``ScoringProgress`` announces the pool's progress from the driver while it runs (the scorers count their blocks
into one small actor; the driver polls it).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any, Mapping, Optional

import numpy as np
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
import torch
from tqdm import tqdm
from transformers import AutoConfig

from tailkd_ray.config import Config
from tailkd_ray.core.summary import TeacherSummary, summarize, summarize_hidden
from tailkd_ray.data.hashing import block_hashes, format_block_hash, row_generator_seed
from tailkd_ray.data.pack import BLOCK_COLUMNS, BLOCK_DTYPES
from tailkd_ray.errors import ConfigError, DataError, NonFiniteLogitsError, VocabularyError
from tailkd_ray.models import check_vocab_compatible, inference_dtype, load_model
from tailkd_ray.placement import require_teacher_placement, teacher_ray_options

log = logging.getLogger(__name__)

_LOGP_DTYPES = {"float16": torch.float16, "float32": torch.float32}
LeanHead = tuple[torch.nn.Module, torch.nn.Linear, Optional[float]]  # (decoder, LM head, final-logit softcap)


def input_ids_matrix(batch: Mapping[str, Any], seq_len: int) -> np.ndarray:
    """The batch's ``input_ids`` as an int64 [B, seq_len + 1] array; ragged or wrong-length rows are errors."""
    if "input_ids" not in batch:
        raise KeyError(f"teacher input batch has no 'input_ids' column (it has {sorted(batch)}); "
                       f"score packed blocks of seq_len + 1 token ids")
    ids = batch["input_ids"]
    if ids.dtype == object:  # list column of possibly ragged rows
        for row, values in enumerate(ids):
            if len(values) != seq_len + 1:
                raise DataError(f"input_ids row {row} of this batch has {len(values)} tokens; packed blocks "
                                f"must have data.seq_len + 1 = {seq_len + 1}")
        ids = np.stack(ids)
    if ids.ndim != 2 or ids.shape[1] != seq_len + 1:
        raise DataError(f"input_ids has shape {ids.shape}; packed blocks must be [rows, data.seq_len + 1 = "
                        f"{seq_len + 1}]")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


class TeacherScorer:
    """Ray Data callable class: ``{"input_ids": [B, T+1]}`` -> ``input_ids`` + the five summary columns.

    Output shapes: ``top_ids``/``top_logp`` [B, T, M], ``rest_logmass`` [B, T], ``tail_ids``/``tail_logp``
    [B, T, S]. The block's ``loss_mask`` and ``position_ids`` columns are passed on (the teacher runs with the
    position ids, so packed samples do not attend to each other); other input columns are not (they only serve to
    name a row in errors).
    """

    def __init__(self, *, model_path: str, seq_len: int, top_m: int, tail_samples: int, temperature: float,
                 seed: int, logp_dtype: str = "float16", use_gpu: bool = False, trust_remote_code: bool = False,
                 shared_vocab: Optional[int] = None, progress=None):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # bf16 on a GPU, float32 on CPU; transformers' default attention, which is SDPA wherever the architecture
        # supports it (asking for "sdpa" outright would refuse teachers without it, e.g. Gemma 2: eager).
        self.model = load_model(model_path, trust_remote_code=trust_remote_code, device=self.device,
                                dtype=inference_dtype(self.device))
        rows = self.model.get_input_embeddings().num_embeddings
        self.vocab = rows if shared_vocab is None else shared_vocab  # token ids; rows beyond are padding
        self.model_path = model_path
        self.seq_len = seq_len
        self.summary_args = dict(top_m=top_m, tail_samples=tail_samples, temperature=temperature,
                                 logp_dtype=_LOGP_DTYPES[logp_dtype], shared_vocab=self.vocab)
        self.seed = seed
        self.progress = progress  # a ScoringProgress's counter actor, or None
        self.lean = self._lean_head()
        if rows > self.vocab:
            self._report_padding(rows)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = input_ids_matrix(batch, self.seq_len)
        hashes = block_hashes(ids)
        self._check_ids_in_vocab(ids, batch, hashes)
        tokens = torch.from_numpy(ids).to(self.device)
        positions = (torch.from_numpy(np.asarray(batch["position_ids"], np.int64)[:, :-1]).to(self.device)
                     if "position_ids" in batch else None)
        with torch.inference_mode():
            try:
                uniforms = self._row_uniforms(hashes, self.seq_len)
                summary = self._summarize(tokens[:, :-1], self.lean, positions, uniforms=uniforms,
                                          **self.summary_args)
            except NonFiniteLogitsError as err:
                row = err.position[0]
                raise NonFiniteLogitsError(err.position, err.token, context=f"teacher {self.model_path}: "
                                           f"{describe_row(batch, row, hashes[row])}") from err
        if self.progress is not None:
            ray.get(self.progress.add.remote(len(ids)))  # counted before the batch leaves: exact at the end
        out = {"input_ids": ids.astype(np.int32), **summary.to_numpy()}
        for name in BLOCK_COLUMNS[1:]:  # every position is scored; mask and positions travel on to training (DESIGN §1)
            if name in batch:
                out[name] = np.asarray(batch[name], BLOCK_DTYPES[name])
        return out

    def _summarize(self, tokens: torch.Tensor, lean: Optional[LeanHead], positions: Optional[torch.Tensor] = None,
                   **args) -> TeacherSummary:
        """The summary (``summarize`` arguments ``args``) of the teacher on ``tokens`` [B, T] (at ``positions``
        [B, T], restarting per packed sample, when given): from the decoder's last hidden states chunk by chunk when
        ``lean`` is given, else from the model's full logits."""
        if lean is None:
            return summarize(self.model(input_ids=tokens, position_ids=positions, use_cache=False).logits, **args)
        decoder, head, softcap = lean
        hidden = decoder(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
        return summarize_hidden(hidden, head.weight, head.bias, softcap=softcap, **args)

    def _lean_head(self) -> Optional[LeanHead]:
        """The model's decoder, LM head and final-logit softcap, when summaries through them equal those of its own
        logits on a probe block; else None, with a warning why (e.g. logits post-processed otherwise: Cohere's
        logit_scale, Granite's logits_scaling): full logits are then summarised, the same summaries but held whole."""
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        lean = (decoder, head, getattr(self.model.config.get_text_config(), "final_logit_softcapping", None))
        if decoder is self.model or not isinstance(head, torch.nn.Linear):
            reason = f"{type(self.model).__name__} has no separate decoder and linear LM head"
        else:
            reason = self._probe_mismatch(lean)
        if reason is None:
            log.info("teacher %s: summaries from the final hidden states, chunk by chunk", self.model_path)
            return lean
        log.warning("teacher %s: summaries from the full [batch, T, V] logits, not chunk by chunk from the final "
                    "hidden states (the same summaries, more memory): %s", self.model_path, reason)
        return None

    def _probe_mismatch(self, lean: LeanHead) -> Optional[str]:
        """Why summaries through ``lean`` differ from those of the model's logits on a probe block; None if equal."""
        probe = torch.arange(min(self.seq_len, 16), device=self.device)[None] % self.vocab
        args = {**self.summary_args, "tail_samples": 0, "logp_dtype": torch.float32}
        try:
            with torch.inference_mode():
                full, hidden = (self._summarize(probe, path, **args) for path in (None, lean))
        except ValueError as err:  # e.g. hidden states and LM head in different dtypes, or non-finite logits
            return str(err)
        if (torch.equal(hidden.top_ids, full.top_ids) and torch.allclose(hidden.top_logp, full.top_logp)
                and torch.allclose(hidden.rest_logmass, full.rest_logmass)):
            return None
        capped = "" if lean[2] is None else f" softcapped at {lean[2]}"
        return (f"its logits are not its LM head's{capped} on the decoder's last hidden states (on a probe block "
                f"the top log-probs differ by up to {(hidden.top_logp - full.top_logp).abs().max().item():.3g})")

    def _report_padding(self, rows: int) -> None:
        """Log the teacher's padding rows and the mean mass it puts on them on the probe block (counted into
        the summaries' rest mass)."""
        probe = torch.arange(min(self.seq_len, 16), device=self.device)[None] % self.vocab
        with torch.inference_mode():
            logits = self.model(input_ids=probe, use_cache=False).logits.float() / self.summary_args["temperature"]
            logp = torch.log_softmax(logits, dim=-1)
            padding_mass = logp[..., self.vocab:].logsumexp(-1).exp().mean().item()
        log.warning("teacher %s has %d embedding rows for %d tokens: the %d padding rows are never summary ids; on "
                    "a probe block they hold %.3g of its probability mass (mean per position), counted into the "
                    "rest mass", self.model_path, rows, self.vocab, rows - self.vocab, padding_mass)

    def _row_uniforms(self, hashes: np.ndarray, positions: int) -> torch.Tensor:
        """Tail-sampling uniforms [B, T, S], one CPU generator per block seeded by (seed, block hash): a block
        gets the same samples whichever actor, batch or device scores it."""
        samples = self.summary_args["tail_samples"]
        generators = [torch.Generator().manual_seed(row_generator_seed(self.seed, h)) for h in hashes]
        return torch.stack([torch.rand(positions, samples, generator=g) for g in generators])

    def _check_ids_in_vocab(self, ids: np.ndarray, batch: Mapping[str, Any], hashes: np.ndarray) -> None:
        bad = (ids < 0) | (ids >= self.vocab)
        if bad.any():
            row, pos = (int(i) for i in np.argwhere(bad)[0])
            raise VocabularyError(f"{describe_row(batch, row, hashes[row])}: token id {ids[row, pos]} at position "
                                  f"{pos} is outside the teacher's vocabulary [0, {self.vocab}); the data was "
                                  f"tokenized with another tokenizer than the teacher's (check data.tokenizer)")


def describe_row(batch: Mapping[str, Any], row: int, block_hash: int) -> str:
    """A row's identity for error messages: its content hash, first ids and any other columns it carries."""
    ids = np.asarray(batch["input_ids"][row])
    extra = {name: values[row] for name, values in batch.items() if name != "input_ids"}
    where = "".join(f", {name}={value!r}" for name, value in extra.items())
    return (f"block_hash={format_block_hash(block_hash)} (row {row} of its batch{where}, input_ids starting "
            f"{ids[:8].tolist()})")


@ray.remote(num_cpus=0)
class _BlocksScored:
    """The pool's count of scored blocks, to which every scorer adds its batches."""

    def __init__(self):
        self.blocks = 0

    def add(self, blocks: int) -> None:
        self.blocks += blocks

    def read(self) -> int:
        return self.blocks


class ScoringProgress:
    """The teacher pool's progress, announced by the driver while the pool runs (a context manager; its
    ``counter`` goes to ``score_dataset``): blocks scored (of ``total``, when known) and tokens/s, a line at every
    twentieth of ``total`` but at most one every ``MIN_LINE_S``, and the final count at the end; or a live tqdm
    bar when stderr is a terminal. Without a total (a pool streaming into training, which takes blocks as it
    needs them, each evaluation its val blocks again) only the final count."""

    POLL_S = 1.0
    MIN_LINE_S = 30.0
    LINES = 20

    def __init__(self, label: str, seq_len: int, total: Optional[int] = None):
        self.label, self.seq_len, self.total = label, seq_len, total
        # on the driver's node: a counter on a worker node would die with that node and fail every scorer
        here = ray.get_runtime_context().get_node_id()
        self.counter = _BlocksScored.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
        self._shown = 0  # the count of the last line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> ScoringProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        blocks = ray.get(self.counter.read.remote())
        if blocks != self._shown:
            self._log(blocks)
        ray.kill(self.counter)

    def _log(self, blocks: int) -> None:
        seconds = max(time.monotonic() - self._started, 1e-9)
        of = "" if self.total is None else f"/{self.total:,}"
        log.info("%s: %s%s blocks scored, %s tokens/s, %.0f s", self.label, f"{blocks:,}", of,
                 f"{blocks * self.seq_len / seconds:,.0f}", seconds)
        self._shown = blocks

    def _watch(self) -> None:
        bar = tqdm(total=self.total, desc=self.label, unit="block") if sys.stderr.isatty() else None
        marks = [] if self.total is None else [math.ceil(i * self.total / self.LINES) for i in range(1, self.LINES + 1)]
        last_line = time.monotonic()
        while not self._stop.wait(self.POLL_S):
            blocks = ray.get(self.counter.read.remote())
            if bar is not None:
                bar.update(blocks - bar.n)
                self._shown = blocks
            elif marks and blocks >= marks[0] and time.monotonic() - last_line >= self.MIN_LINE_S:
                self._log(blocks)
                marks, last_line = [mark for mark in marks if mark > blocks], time.monotonic()
        if bar is not None:
            bar.close()


def scorer_kwargs(cfg: Config, shared_vocab: Optional[int] = None) -> dict:
    """``TeacherScorer`` constructor arguments from a config; ``shared_vocab``: the tokenizer's length
    (``models.check_vocab_compatible``), None = every row of the teacher's embedding."""
    if cfg.teacher.model is None:
        raise ConfigError("teacher.model is not set: give the teacher's Hugging Face model path")
    if cfg.summary.top_m is None:
        raise ConfigError("summary.top_m is null (co-located teacher, full logits in each training worker): "
                          "there is no teacher pool to run; set summary.top_m to score summaries")
    return dict(model_path=str(cfg.teacher.model), seq_len=cfg.data.seq_len, top_m=cfg.summary.top_m,
                tail_samples=cfg.summary.tail_samples, temperature=cfg.loss.temperature, seed=cfg.train.seed,
                logp_dtype=cfg.summary.logp_dtype, use_gpu=cfg.teacher.num_gpus > 0,
                trust_remote_code=cfg.teacher.trust_remote_code, shared_vocab=shared_vocab)


def teacher_map_args(cfg: Config, shared_vocab: Optional[int] = None) -> dict:
    """``map_batches`` keyword arguments that run ``TeacherScorer`` as the configured actor pool.

    Actors are placed by ``teacher.num_gpus`` and ``teacher.resources`` (custom resources that only inference
    nodes offer), through ``placement.teacher_ray_options`` so the placement check asks for the same.

    Fault tolerance is Ray Data's default for actor pools in Ray 2.60: a dead actor (lost node, OOM kill) is
    restarted and its in-flight tasks are retried (``max_restarts = max_task_retries = -1``), so every block
    is scored exactly once; exceptions raised by the scorer (bad input, non-finite logits) are not retried
    and fail the run. Those two options are only reachable through ``map_batches``'s deprecated
    ``**ray_remote_args`` (removal announced for Ray 2.64), so they are left at the defaults.
    """
    return dict(fn_constructor_kwargs=scorer_kwargs(cfg, shared_vocab),
                compute=ray.data.ActorPoolStrategy(min_size=cfg.teacher.min_actors, max_size=cfg.teacher.max_actors),
                batch_size=cfg.teacher.sequences_per_batch(cfg.data.seq_len), batch_format="numpy",
                **teacher_ray_options(cfg.teacher))


def check_teacher_context(cfg: Config) -> None:
    """Fail before any work when packed blocks are longer than the teacher's context window."""
    config = AutoConfig.from_pretrained(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code)
    window = getattr(config.get_text_config(), "max_position_embeddings", None)
    if window is not None and cfg.data.seq_len > window:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} exceeds the teacher's context window "
                          f"({window} positions in {cfg.teacher.model}/config.json); lower data.seq_len")


def score_dataset(blocks, cfg: Config, progress: Optional[ScoringProgress] = None):
    """Lazily score a Dataset of packed ``input_ids`` blocks with the teacher actor pool (streaming); the scorers
    count their blocks into ``progress`` when given.

    Checks first, before any work, that the teacher, student and data tokenizer share one token table (whose
    length, the shared vocabulary, bounds the summaries' ids), that
    blocks fit the teacher's context window and that the cluster can host the pool (or, with
    ``autoscaling``, logs what it waits for).
    """
    scorer_kwargs(cfg)  # a config without a teacher pool fails first, by name
    shared_vocab = check_vocab_compatible(cfg.teacher.model, cfg.student.model or cfg.student.config,
                                          cfg.data.tokenizer, trust_remote_code=cfg.teacher.trust_remote_code)
    kwargs = teacher_map_args(cfg, shared_vocab)
    if progress is not None:
        kwargs["fn_constructor_kwargs"]["progress"] = progress.counter
    check_teacher_context(cfg)
    require_teacher_placement(cfg.teacher, allow_autoscale=cfg.autoscaling)
    log.info("teacher pool: %s, %d-%d actors, %s GPU(s) and resources %s per actor, batch %d sequences",
             cfg.teacher.model, cfg.teacher.min_actors, cfg.teacher.max_actors, cfg.teacher.num_gpus,
             cfg.teacher.resources, kwargs["batch_size"])
    return blocks.map_batches(TeacherScorer, **kwargs)
