"""Batched text generation with an instruct (chat) model: the HF engine.

Rows are chat-formatted, tokenized once, truncated when too long and grouped by length
(:func:`plan_batches`) into decode batches. Each batch is prefilled in chunks on the call's shared
prefix and joined into one wide decode batch for ``model.generate``, or, where the model's cache
cannot be joined, runs its whole prompts through ``generate`` (:mod:`shardwise.gpu_runtime.prefill`).

Host work overlaps device work: while one batch generates, the prefetch thread builds the next
batch's inputs (padding, masks, the prefill chunks' ids and positions; pinned on CUDA) and a decode
thread turns the finished batch's tokens into text (:mod:`shardwise.gpu_runtime.prefetch`). Every prompt is
still tokenized before the first batch: the length-sorted batch plan and the shared prefix need
all of them. Set ``GenerationEngine.overlap_host_work = False`` for the serial path (same results).

A batch that runs out of memory is halved and retried, and later batches (of this and every later
call on the engine) are capped at the size that worked (:mod:`shardwise.gpu_runtime.backoff`).

Plain greedy batches decode in the engine's own loop, which drops rows from the batch as they end
(:mod:`shardwise.gpu_runtime.greedy`); sampling, penalties and output schemas use ``generate``.
Decoding is decided by :class:`GenerationParams` alone (:mod:`shardwise.gpu_runtime.sampling`), so
a greedy row decodes the same on every path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .attention import use_grouped_kv_attention
from .backoff import BatchBackoff
from .batching import plan_batches
from .compute_thread import check_cancelled, on_compute_thread
from .decoding import decode_answer
from .device import default_dtype, placement_kwargs
from .dummy import build_causal_lm
from .errors import EngineError
from .generation_params import Generation, GenerationParams
from .gguf_cache import weights_dir
from .greedy import greedy_decode
from .prefetch import prefetched, to_device
from .prefill import BatchInputs, Prefix, batch_inputs, prefill, shared_prefix
from .prompts import encode_chat
from .sampling import (
    AnswerFrequencyPenalty,
    BatchTokens,
    eos_token_ids,
    finished_rows,
    generation_config,
    token_ids_only,
)
from .sizing import CPU_MAX_BATCH_SIZE, CPU_TOKEN_BUDGET, auto_batch_limits, free_device_bytes, kv_bytes_per_token
from .structured import repair_unfinished

if TYPE_CHECKING:
    from .model_specs import ResolvedModel

__all__ = ["GenerationEngine"]


class GenerationEngine:
    """A causal LM and its tokenizer, ready for batched chat generation.

    Obtain one with :func:`gpu_runtime.load_generation_engine` (cached per process). Calls to
    :meth:`generate` on one engine run one at a time: the device is the bottleneck anyway, and
    the fast tokenizer is not safe to share between threads.
    """

    def __init__(self, model: Any, tokenizer: Any, info: dict[str, Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Decoder-only models continue from the last position: pad on the left.
        self.tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise EngineError(f"tokenizer of {info.get('spec')!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self._eos_ids = eos_token_ids(model, tokenizer)
        model.generation_config = token_ids_only(model.generation_config)
        self._has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.max_context: int | None = _max_context(model, tokenizer)
        self.info: dict[str, Any] = {**info, "max_context": self.max_context}
        self._lock = threading.Lock()
        # Lives as long as the engine: a batch size that ran out of memory is not tried again on
        # the next call (the next shard) either.
        self.backoff = BatchBackoff(self.device, what=f"generation with {info.get('spec')!r}")
        from . import kv_cache  # imports transformers: not at module level (see __init__.py)

        # The forward's name for a KV cache argument, or None where ours cannot be padded and
        # joined (then every batch runs the whole prompt through generate()).
        self._cache_arg = kv_cache.joinable_cache_argument(model)
        self._grammars: Any = None  # compiled output schemas, made on the first call with one
        # Build the next batch's inputs and decode the last batch's text on helper threads while
        # the device generates; False does both on the compute thread, in line (same results).
        self.overlap_host_work = True
        # Greedy rows leave their decode batch as they end (greedy.py); False keeps every row in
        # transformers' generate() until the batch's longest answer ends (same results).
        self.drop_finished_rows = True

    @classmethod
    def from_resolved(
        cls, resolved: ResolvedModel, device: torch.device, attn_implementation: str | None = None
    ) -> GenerationEngine:
        """Load the weights of ``resolved`` (converting a GGUF once, see gguf_cache.py) onto ``device``;
        a ``dummy:`` spec gets seeded random weights created on ``device`` (see dummy.py).
        ``attn_implementation`` (``"sdpa"``, ``"eager"``, ...) is passed to ``from_pretrained``;
        None lets transformers pick what the architecture supports (Gemma-2 refuses sdpa)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = default_dtype(device)
        if resolved.source == "dummy":
            model, tokenizer, _ = build_causal_lm(resolved.spec, device, dtype)
            path = resolved.path
        else:
            path = weights_dir(resolved)
            tokenizer = AutoTokenizer.from_pretrained(path)
            attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention, **placement_kwargs(device))
            if device.type != "cuda":
                model.to(device)
        model.eval()
        use_grouped_kv_attention(model)
        import transformers

        info = {
            **resolved.engine_info(dtype, device),
            "loaded_from": path,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "engine": "hf",
            "engine_version": f"transformers {transformers.__version__}",
        }
        return cls(model, tokenizer, info)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """Generate one answer per prompt, returned in input order.

        Each prompt is the *user* text (it is wrapped in the model's chat template here) and must
        be a non-empty string: deciding what an empty or null cell means is the caller's job.
        Prompts longer than the input limit are truncated, never rejected.
        """
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}")
        if not prompts:
            return []
        return self._decode_call(prompts, params)

    def _decode_call(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """One checked ``generate`` call: on the compute thread (one OpenMP team per process)."""
        return on_compute_thread(repair_unfinished, self._generate, prompts, params)

    def _generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        limit = self._input_limit(params)
        with self._lock:
            encoded = [self._encode_prompt(prompt, params, limit) for prompt in prompts]
            config = self._generation_config(params)
            if params.seed is not None:
                torch.manual_seed(params.seed)
            results: list[Generation | None] = [None] * len(prompts)
            token_budget, max_batch_size = self.batch_limits(params)
            batches = plan_batches(
                [len(ids) for ids, _ in encoded],
                token_budget=token_budget,
                max_batch_size=max_batch_size,
                extra_tokens_per_row=params.max_new_tokens,
            )
            prefix = self._shared_prefix([ids for ids, _ in encoded], params)
            if params.output_schema is not None:
                self._schema_grammars().compiled(params.output_schema)  # a bad schema fails before any batch

            def prepare(rows: list[int]) -> BatchInputs:
                return self._batch_inputs([encoded[i][0] for i in rows], config, prefix)

            def run(batch: list[int], inputs: BatchInputs) -> Callable[[list[int]], list[BatchTokens]]:
                # A batch split after running out of memory builds its halves' inputs in line.
                return lambda rows: self._generate_batch(
                    inputs if rows == batch else prepare(rows),
                    config,
                    params.ignore_eos,
                    prefix,
                    params.output_schema,
                    params.frequency_penalty,
                )

            overlap = self.overlap_host_work
            decoded: list[tuple[list[int], list[BatchTokens], concurrent.futures.Future[list[str]]]] = []
            with contextlib.ExitStack() as threads:
                decoder = (
                    threads.enter_context(
                        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwise-decode")
                    )
                    if overlap
                    else None
                )
                # Entered after the decoder, so closed before it: an error stops the prefetching,
                # then waits for the decodes already submitted. No helper thread outlives the call.
                prepared = threads.enter_context(
                    contextlib.closing(prefetched(batches, prepare) if overlap else _in_line(batches, prepare))
                )
                for batch, inputs in prepared:
                    check_cancelled()
                    outputs = self.backoff.run(
                        batch,
                        run(batch, inputs),
                        describe_row=lambda i: (
                            f"prompt {i}: {len(encoded[i][0])} tokens + max_new_tokens={params.max_new_tokens}"
                        ),
                    )
                    tokens = [row_tokens for row_tokens, _ in outputs]
                    texts = decoder.submit(self._decode, tokens) if decoder else _done(self._decode(tokens))
                    decoded.append((batch, outputs, texts))
            for batch, outputs, texts in decoded:
                for i, (row_tokens, finish), text in zip(batch, outputs, texts.result(), strict=True):
                    ids, truncated = encoded[i]
                    results[i] = Generation(text, len(ids), len(row_tokens), finish, truncated)
        return results  # type: ignore[return-value]

    def batch_limits(self, params: GenerationParams) -> tuple[int, int]:
        """``(token_budget, max_batch_size)`` for a call: the params' own, or sized for the device."""
        if params.token_budget is not None and params.max_batch_size is not None:
            return params.token_budget, params.max_batch_size
        if self.device.type == "cuda":
            per_token = kv_bytes_per_token(self.model.config, self.model.dtype)
            auto = auto_batch_limits(free_device_bytes(self.device), per_token)
        else:
            auto = (CPU_TOKEN_BUDGET, CPU_MAX_BATCH_SIZE)
        return params.token_budget or auto[0], params.max_batch_size or auto[1]

    def _input_limit(self, params: GenerationParams) -> int:
        """Longest chat prompt allowed: the caller's cap and room for max_new_tokens in the context."""
        limit = params.max_input_tokens or math.inf
        if self.max_context is not None:
            limit = min(limit, self.max_context - params.max_new_tokens)
        if limit < 1:
            raise ValueError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the model's "
                f"{self.max_context}-token context"
            )
        return int(limit) if limit != math.inf else 2**62

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self._has_chat_template, verbose=False)["input_ids"]

    def _encode(self, user_text: str, system_prompt: str | None, limit: int) -> tuple[list[int], bool]:
        """Token ids of the chat prompt, shortening the user text (not the template) to fit ``limit``."""
        return encode_chat(self.tokenizer, user_text, limit, system_prompt=system_prompt)

    def _encode_prompt(self, user_text: str, params: GenerationParams, limit: int) -> tuple[list[int], bool]:
        """The prompt as every engine feeds it: system prompt, template variables and the run's date."""
        return encode_chat(
            self.tokenizer,
            user_text,
            limit,
            system_prompt=params.system_prompt,
            template_kwargs=params.chat_template_kwargs,
            date=params.chat_date,
        )

    def _generation_config(self, params: GenerationParams) -> Any:
        """The transformers ``GenerationConfig`` of a call, with this tokenizer's pad and eos ids."""
        return generation_config(params, self.tokenizer.pad_token_id, self._eos_ids)

    def _shared_prefix(self, prompts: list[list[int]], params: GenerationParams) -> Prefix | None:
        """The call's shared prompt prefix and its KV cache, or None (see :func:`shared_prefix`)."""
        return shared_prefix(self.model, self._cache_arg, prompts, params)

    def _batch_inputs(self, batch_ids: list[list[int]], config: Any, prefix: Prefix | None) -> BatchInputs:
        """One decode batch's host-side inputs for this model (see :func:`batch_inputs`)."""
        return batch_inputs(
            batch_ids, config, prefix, cache_arg=self._cache_arg, pad_id=self.tokenizer.pad_token_id, device=self.device
        )

    def _schema_grammars(self) -> Any:
        if self._grammars is None:
            from .structured import SchemaGrammars

            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self._grammars = SchemaGrammars(self.tokenizer, vocab_size, self._eos_ids)
        return self._grammars

    def _generate_batch(
        self,
        inputs: BatchInputs,
        config: Any,
        ignore_eos: bool = False,
        prefix: Prefix | None = None,
        output_schema: str | None = None,
        frequency_penalty: float = 0.0,
    ) -> list[BatchTokens]:
        """One batch's device work (prefill, then the greedy loop or ``generate``): per row, its new
        tokens through the first eos, and why it ended."""
        with torch.inference_mode():
            plain_greedy = self.drop_finished_rows and not (
                config.do_sample or ignore_eos or frequency_penalty or output_schema
            )
            if inputs.plain is None:
                cache, mask = prefill(self.model, self._cache_arg, inputs, prefix, room=config.max_new_tokens)
                last = to_device({"last": inputs.last}, self.device)["last"]
                if plain_greedy:
                    # Rows leave the batch as they end (see greedy.py); the rest goes through generate.
                    answers = greedy_decode(
                        self.model, self._cache_arg, cache, mask, last, config.max_new_tokens, self._eos_ids
                    )
                    return finished_rows(answers, self._eos_ids, ignore_eos)
                # generate() runs only the tokens the cache lacks: each row's last one. The filler
                # stands for the cached ones (only its length matters) and is sliced off below.
                filler = torch.full((inputs.rows, mask.shape[1]), self.tokenizer.pad_token_id, device=self.device)
                input_ids = torch.cat([filler, last], dim=1)
                attention_mask = torch.cat([mask, torch.ones_like(last)], dim=1)
                kwargs = {self._cache_arg: cache}
            else:
                plain = to_device({"input_ids": inputs.plain[0], "attention_mask": inputs.plain[1]}, self.device)
                input_ids, attention_mask = plain["input_ids"], plain["attention_mask"]
                kwargs = {}
            processors: list[Any] = []
            if frequency_penalty:
                processors.append(AnswerFrequencyPenalty(frequency_penalty, answer_start=input_ids.shape[1]))
            if output_schema:
                # One processor per generate() call: its per-row matchers follow this batch's rows
                # only (both paths above feed it the same per-row tokens).
                processors.append(self._schema_grammars().logits_processor(output_schema))
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors or None,
                **kwargs,
            )
        return finished_rows(output[:, input_ids.shape[1] :].tolist(), self._eos_ids, ignore_eos)

    def _decode(self, batch_tokens: list[list[int]]) -> list[str]:
        """Each row's answer text (on the decode thread when host work overlaps)."""
        return [decode_answer(self.tokenizer, tokens) for tokens in batch_tokens]


def _in_line(
    batches: list[list[int]], prepare: Callable[[list[int]], BatchInputs]
) -> Iterator[tuple[list[int], BatchInputs]]:
    """The serial counterpart of :func:`prefetched`: each batch prepared right before its use."""
    for batch in batches:
        yield batch, prepare(batch)


def _done(value: list[str]) -> concurrent.futures.Future[list[str]]:
    future: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
    future.set_result(value)
    return future


def _max_context(model: Any, tokenizer: Any) -> int | None:
    for value in (
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        # model_max_length is a huge sentinel (1e30) when the tokenizer does not know it.
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return None
