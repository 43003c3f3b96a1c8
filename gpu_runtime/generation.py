"""Batched text generation with an instruct (chat) model.

Rows are chat-formatted, tokenized once, truncated when too long and grouped by length
(:func:`plan_batches`) into decode batches. Within a call, the tokens every prompt starts with (the
chat template's system turn, the prompt template's first words) are run through the model once and
their KV cache is shared; each batch's rows are then prefilled in chunks of similar length on top
of it and joined, left-padded, into one wide decode batch for ``model.generate``. Prefill is
compute-bound and decoding is bound by reading the weights, so the two want different batch
shapes (see docs/benchmarks.md). Models whose cache cannot be joined that way (sliding-window,
encoder-decoder) and ``cache="static"`` run each batch's whole prompts through ``generate``.

Host work overlaps device work: while one batch generates, the prefetch thread builds the next
batch's inputs (padding, masks, the prefill chunks' ids and positions; pinned on CUDA) and a decode
thread turns the finished batch's tokens into text (:mod:`shardwise.gpu_runtime.prefetch`). Every prompt is
still tokenized before the first batch: the length-sorted batch plan and the shared prefix need
all of them. Set ``GenerationEngine.overlap_host_work = False`` for the serial path (same results).

A batch that runs out of memory is halved and retried, and later batches (of this and every later
call on the engine) are capped at the size that worked (:mod:`shardwise.gpu_runtime.backoff`).

Decoding is decided by :class:`GenerationParams` alone: the model's own generation_config (which
checkpoints ship with sampling knobs, penalties, a ``cache_implementation``) is reduced to its
bos, eos and pad ids at load, so a greedy row decodes the same on every path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .backoff import BatchBackoff
from .batching import plan_batches
from .compute_thread import check_cancelled, on_compute_thread
from .decoding import decode_answer
from .device import default_dtype, placement_kwargs
from .dummy import build_causal_lm
from .errors import EngineError
from .gguf_cache import weights_dir
from .prefetch import host_tensor, prefetched, to_device
from .prompts import RESERVED_TEMPLATE_KWARGS, encode_chat
from .sizing import CPU_MAX_BATCH_SIZE, CPU_TOKEN_BUDGET, auto_batch_limits, free_device_bytes, kv_bytes_per_token

if TYPE_CHECKING:
    from .model_specs import ResolvedModel

__all__ = ["Generation", "GenerationEngine", "GenerationParams"]


@dataclass
class GenerationParams:
    """How to generate. ``temperature=0`` means greedy (deterministic) decoding.

    ``max_input_tokens`` caps the chat-formatted prompt (longer user text is truncated);
    ``token_budget`` caps a batch's padded tokens, prompt plus ``max_new_tokens`` per row, which is
    what bounds memory; ``max_batch_size`` caps rows per batch. Left at None, both are sized by the
    engine: on CUDA from the free device memory and the model's KV bytes per token
    (:mod:`shardwise.gpu_runtime.sizing`), elsewhere 16384 tokens and 64 rows. Sampling uses ``temperature``
    and ``top_p`` only (no top-k); nothing in the model's generation_config but its bos, eos and
    pad ids is used, so the same params mean the same decoding for every model.

    ``chat_template_kwargs`` become variables of the chat template (``{"enable_thinking": False}``
    for Qwen3); ``chat_date`` is the date a template that prints today's date (Llama-3.1's,
    Mistral's) shows instead of the wall clock's (see :func:`shardwise.gpu_runtime.prompts.build_chat`).

    ``ignore_eos=True`` (like vLLM's ``ignore_eos``) makes every row generate exactly
    ``max_new_tokens`` tokens, with ``finish_reason="length"``: the eos tokens are masked out until
    then, so the text never ends early. Meant for throughput benchmarks (e.g. with ``dummy:``
    models, whose random weights rarely emit eos); the text then runs on past the natural answer.
    Dummy specs do not switch it on by themselves.

    ``cache="static"`` preallocates the KV cache, and ``compile=True`` lets transformers
    ``torch.compile`` the decode step for it (GPU only; every new batch shape compiles again).
    Both are off by default, to be switched on where a measurement shows a gain.

    ``output_schema`` (a JSON Schema as JSON text) constrains every row's answer to JSON that
    follows it: the schema is compiled once per engine into an xgrammar grammar that masks the
    tokens it does not allow at each step (:mod:`shardwise.gpu_runtime.structured`). It cannot be combined
    with ``ignore_eos``, which would forbid the end the grammar asks for.

    If a batch runs out of device memory it is split in half and retried (later batches of the
    call are capped at the size that worked). Greedy outputs do not depend on the split; sampled
    outputs of a call that had to split may differ from an un-split run's.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system_prompt: str | None = None
    max_input_tokens: int | None = None
    token_budget: int | None = None
    max_batch_size: int | None = None
    ignore_eos: bool = False
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_date: dt.date | None = None
    output_schema: str | None = None

    def __post_init__(self) -> None:
        _require_positive_int("max_new_tokens", self.max_new_tokens)
        for name in ("token_budget", "max_batch_size"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        if self.max_input_tokens is not None:
            _require_positive_int("max_input_tokens", self.max_input_tokens)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {self.system_prompt!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")
        if not isinstance(self.compile, bool) or (self.compile and self.cache != "static"):
            raise ValueError("compile=True needs cache='static' (torch.compile wants fixed cache shapes)")
        if self.chat_template_kwargs is not None:
            if not isinstance(self.chat_template_kwargs, dict) or not all(
                isinstance(k, str) for k in self.chat_template_kwargs
            ):
                raise ValueError(f"chat_template_kwargs must be a dict of names, got {self.chat_template_kwargs!r}")
            if reserved := sorted(RESERVED_TEMPLATE_KWARGS & self.chat_template_kwargs.keys()):
                raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)} (set by the engine)")
        if self.chat_date is not None and (
            not isinstance(self.chat_date, dt.date) or isinstance(self.chat_date, dt.datetime)
        ):
            raise ValueError(f"chat_date must be a datetime.date, got {self.chat_date!r}")
        if self.output_schema is not None:
            if not isinstance(self.output_schema, str) or not self.output_schema.lstrip().startswith("{"):
                raise ValueError(f"output_schema must be a JSON Schema as JSON text, got {self.output_schema!r}")
            if self.ignore_eos:
                raise ValueError("output_schema cannot be combined with ignore_eos (the grammar must end the answer)")


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class Generation:
    """One row's output. ``finish_reason`` is ``"stop"`` when the model ended its answer and
    ``"length"`` when ``max_new_tokens`` cut it; ``truncated`` says the prompt was shortened."""

    text: str
    n_prompt_tokens: int
    n_generated_tokens: int
    finish_reason: Literal["stop", "length"]
    truncated: bool


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
        model.generation_config = _token_ids_only(model.generation_config)
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
        return on_compute_thread(self._generate, prompts, params)

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

            def prepare(rows: list[int]) -> _BatchInputs:
                return self._batch_inputs([encoded[i][0] for i in rows], config, prefix)

            def run(batch: list[int], inputs: _BatchInputs) -> Callable[[list[int]], list[_BatchTokens]]:
                # A batch split after running out of memory builds its halves' inputs in line.
                return lambda rows: self._generate_batch(
                    inputs if rows == batch else prepare(rows), config, params.ignore_eos, prefix, params.output_schema
                )

            overlap = self.overlap_host_work
            decoded: list[tuple[list[int], list[_BatchTokens], concurrent.futures.Future[list[str]]]] = []
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
        from transformers import GenerationConfig

        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            # top_k=0 switches off transformers' default top-k=50: only the knobs we expose apply.
            sampling = {
                "do_sample": True,
                "temperature": float(params.temperature),
                "top_p": float(params.top_p),
                "top_k": 0,
            }
        if params.ignore_eos:
            # The eos ids are masked until max_new_tokens is reached: every row runs to the end.
            sampling["min_new_tokens"] = params.max_new_tokens
        if params.cache == "static":
            # A preallocated KV cache; transformers compiles the decode step for it on GPUs unless
            # told not to. Off by default: each new batch shape recompiles (see bench/gpu_check.sh).
            sampling["cache_implementation"] = "static"
            sampling["disable_compile"] = not params.compile
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self._eos_ids),
            **sampling,
        )

    def _shared_prefix(self, prompts: list[list[int]], params: GenerationParams) -> _Prefix | None:
        """The tokens every prompt of the call starts with (chat template, system prompt, the
        template's opening words) and their KV cache, computed once; None where reuse does not apply."""
        if self._cache_arg is None or params.cache != "dynamic" or len(prompts) < 2:
            return None
        # Every row keeps at least its last prompt token for generate() to process.
        limit = min(len(ids) for ids in prompts) - 1
        first, n = prompts[0], 0
        while n < limit and all(ids[n] == first[n] for ids in prompts):
            n += 1
        if n < MIN_SHARED_PREFIX:
            return None
        from . import kv_cache

        cache = kv_cache.new_cache(self.model)
        with torch.inference_mode():
            self.model(
                input_ids=torch.tensor([first[:n]], device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )
        return _Prefix(n, [(layer.keys, layer.values) for layer in cache.layers])

    def _uses_joined_cache(self, batch_ids: list[list[int]], config: Any, prefix: _Prefix | None) -> bool:
        """Whether a batch is prefilled in chunks and joined (else: whole prompts through generate)."""
        # A one-token prompt with nothing cached before it has no KV cache to pad and join.
        return (
            self._cache_arg is not None
            and config.cache_implementation is None
            and (prefix is not None or min(len(ids) for ids in batch_ids) > 1)
        )

    def _batch_inputs(self, batch_ids: list[list[int]], config: Any, prefix: _Prefix | None) -> _BatchInputs:
        """The host-side inputs of one decode batch (see :meth:`_prefill` for their layout), built
        with numpy (no tokenizer, no torch kernels: this runs on the prefetch thread, beside the
        compute thread's generate and the decode thread's tokenizer) and pinned when bound for CUDA."""
        pad_id = self.tokenizer.pad_token_id
        device = self.device
        if not self._uses_joined_cache(batch_ids, config, prefix):
            # Left padding to a multiple of 8 (as tokenizer.pad(pad_to_multiple_of=8) does): it
            # keeps the number of distinct shapes (and kernel choices) small.
            width = -(-max(len(ids) for ids in batch_ids) // 8) * 8
            ids_array, mask = _left_padded(batch_ids, width, pad_id)
            return _BatchInputs(len(batch_ids), plain=(host_tensor(ids_array, device), host_tensor(mask, device)))
        shared = prefix.length if prefix else 0
        bodies = [ids[shared:-1] for ids in batch_ids]
        chunk_tokens = PREFILL_CHUNK_TOKENS if device.type == "cpu" else 4 * PREFILL_CHUNK_TOKENS
        chunks = plan_batches([len(b) for b in bodies], token_budget=chunk_tokens, max_batch_size=len(bodies))
        length = shared + max(len(b) for b in bodies)
        joined_mask = np.zeros((len(bodies), length), dtype=np.int64)
        prepared: list[_PrefillChunk] = []
        for rows in chunks:
            width = max(len(bodies[i]) for i in rows)
            ids_array, body_mask = _left_padded([bodies[i] for i in rows], width, pad_id)
            mask = np.concatenate([np.ones((len(rows), shared), dtype=np.int64), body_mask], axis=1)
            # Right-aligned, as the chunk's keys and values are (see JoinedKV).
            joined_mask[rows, length - mask.shape[1] :] = mask
            # Positions count unmasked tokens only, as with plain left padding.
            positions = np.maximum(mask.cumsum(-1) - 1, 0)[:, shared:]
            prepared.append(
                _PrefillChunk(
                    rows=host_tensor(np.asarray(rows, dtype=np.int64), device),
                    width=width,
                    ids=host_tensor(ids_array, device),
                    mask=host_tensor(mask, device),
                    positions=host_tensor(np.ascontiguousarray(positions), device),
                )
            )
        last = np.asarray([[ids[-1]] for ids in batch_ids], dtype=np.int64)
        return _BatchInputs(
            len(batch_ids),
            chunks=prepared,
            joined_mask=host_tensor(joined_mask, device),
            last=host_tensor(last, device),
        )

    def _prefill(self, inputs: _BatchInputs, prefix: _Prefix | None, room: int) -> tuple[Any, torch.Tensor]:
        """The KV cache of every prompt but its last token, as one left-padded batch, and its mask.

        Rows are prefilled in chunks of similar length on top of the shared prefix, then joined
        into one decode batch. Prefill is compute-bound, so a wider chunk buys only padding;
        decoding is bound by reading the weights, so the wider its batch, the cheaper each token.
        A row reads ``[left pad | shared prefix | pad | rest of its prompt]``; the mask hides the
        pads and positions count unmasked tokens only, as with plain left padding. The joined cache
        has ``room`` more positions per row preallocated for the tokens to come. ``inputs`` holds
        the host tensors :meth:`_batch_inputs` built for this layout.
        """
        from . import kv_cache

        assert inputs.joined_mask is not None
        # Every chunk's cache is written straight into the joined one, then dropped: the batch's
        # KV is never held twice.
        joined = kv_cache.JoinedKV(inputs.rows, inputs.joined_mask.shape[1], room)
        for chunk in inputs.chunks:
            on_device = to_device(
                {"rows": chunk.rows, "ids": chunk.ids, "mask": chunk.mask, "positions": chunk.positions}, self.device
            )
            n_rows = chunk.ids.shape[0]
            cache = kv_cache.new_cache(self.model)
            if prefix:
                for layer, (keys, values) in enumerate(prefix.kv):
                    cache.update(keys.expand(n_rows, -1, -1, -1), values.expand(n_rows, -1, -1, -1), layer)
            if chunk.width:
                self.model(
                    input_ids=on_device["ids"],
                    attention_mask=on_device["mask"],
                    position_ids=on_device["positions"],
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_arg: cache},
                )
            joined.write(on_device["rows"], [(layer.keys, layer.values) for layer in cache.layers])
            del cache
        return joined.cache(self.model), to_device({"mask": inputs.joined_mask}, self.device)["mask"]

    def _schema_grammars(self) -> Any:
        if self._grammars is None:
            from .structured import SchemaGrammars

            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self._grammars = SchemaGrammars(self.tokenizer, vocab_size, self._eos_ids)
        return self._grammars

    def _generate_batch(
        self,
        inputs: _BatchInputs,
        config: Any,
        ignore_eos: bool = False,
        prefix: _Prefix | None = None,
        output_schema: str | None = None,
    ) -> list[_BatchTokens]:
        """One ``generate`` call: per row, its new tokens through the first eos, and why it ended."""
        # One processor per generate() call: its per-row matchers follow this batch's rows only
        # (both the joined-cache and the plain path below feed it the same per-row tokens).
        processors = [self._schema_grammars().logits_processor(output_schema)] if output_schema else []
        with torch.inference_mode():
            if inputs.plain is None:
                cache, mask = self._prefill(inputs, prefix, room=config.max_new_tokens)
                last = to_device({"last": inputs.last}, self.device)["last"]
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
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors or None,
                **kwargs,
            )
        rows: list[_BatchTokens] = []
        for new_tokens in output[:, input_ids.shape[1] :].tolist():
            # Rows that finish early are filled with pad (often == eos) up to the batch's longest:
            # count through the first eos only.
            # With ignore_eos every row runs to max_new_tokens and nothing is padding.
            stop_at = (
                None if ignore_eos else next((k for k, tok in enumerate(new_tokens) if tok in self._eos_ids), None)
            )
            n_new = len(new_tokens) if stop_at is None else stop_at + 1
            rows.append((new_tokens[:n_new], "length" if stop_at is None else "stop"))
        return rows

    def _decode(self, batch_tokens: list[list[int]]) -> list[str]:
        """Each row's answer text (on the decode thread when host work overlaps)."""
        return [decode_answer(self.tokenizer, tokens) for tokens in batch_tokens]


MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a cache of their own
PREFILL_CHUNK_TOKENS = 2048  # padded prompt tokens prefilled together


@dataclass
class _Prefix:
    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]


# One row of a generate() call: its new tokens through the first eos, and why it ended.
_BatchTokens = tuple[list[int], Literal["stop", "length"]]


@dataclass
class _PrefillChunk:
    """One prefill chunk's host tensors: its rows' places in the decode batch, their left-padded
    prompt bodies (``width`` columns), the mask over prefix + body, and the bodies' positions."""

    rows: torch.Tensor
    width: int
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


@dataclass
class _BatchInputs:
    """A decode batch's inputs on the host: ``plain`` (input ids, attention mask) for whole prompts
    through generate, or the prefill ``chunks``, the joined cache's mask and each row's last token."""

    rows: int
    plain: tuple[torch.Tensor, torch.Tensor] | None = None
    chunks: list[_PrefillChunk] = field(default_factory=list)
    joined_mask: torch.Tensor | None = None
    last: torch.Tensor | None = None


def _left_padded(rows: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` right-aligned in a ``(len(rows), width)`` array of ``pad_id``, and the mask of the real tokens."""
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, row in enumerate(rows):
        if row:
            ids[j, width - len(row) :] = row
            mask[j, width - len(row) :] = 1
    return ids, mask


def _in_line(
    batches: list[list[int]], prepare: Callable[[list[int]], _BatchInputs]
) -> Iterator[tuple[list[int], _BatchInputs]]:
    """The serial counterpart of :func:`prefetched`: each batch prepared right before its use."""
    for batch in batches:
        yield batch, prepare(batch)


def _done(value: list[str]) -> concurrent.futures.Future[list[str]]:
    future: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
    future.set_result(value)
    return future


# What a model's generation_config may keep: token ids the model was trained with, not decoding choices.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _token_ids_only(loaded: Any) -> Any:
    """A generation_config holding only ``loaded``'s token ids. transformers fills every field a
    ``GenerationConfig`` passed to ``generate`` leaves unset from the model's (penalties, no-repeat
    n-grams, sampling knobs, ``cache_implementation``): with this one, only the engine's own count."""
    from transformers import GenerationConfig

    kept = {name: getattr(loaded, name, None) for name in _TOKEN_ID_FIELDS}
    return GenerationConfig(**{name: value for name, value in kept.items() if value is not None})


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's eos plus the generation config's (may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise EngineError("model has no eos token: generation could never stop")
    return frozenset(ids)


def _max_context(model: Any, tokenizer: Any) -> int | None:
    for value in (
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        # model_max_length is a huge sentinel (1e30) when the tokenizer does not know it.
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return None
