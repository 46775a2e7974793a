"""Text generation with mlx-lm: chat templates, sampling, stop sequences, streaming,
continuous batching of concurrent requests, and the model's LoRA adapters."""

from __future__ import annotations

import asyncio
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batching import BatchEngine, Sequence
from deployments.constraints import GrammarMask, GrammarTokenizer
from deployments.gguf import converted_model_dir
from deployments.kv_hold import KvHold
from deployments.generative import CompletionTracker, GenerativeServer, make_sampler
from deployments.model_server import LoadReport, ReplicaState
from deployments.prompt_store import PromptStore, model_key
from policies.errors import ApiError, controller_unavailable, find_api_error
from policies.generation import AdapterRef, GenerationRequest, token_budget
from policies.config import CONTROLLER_NAME, AppConfig, ModelEntry
from policies.detection import gguf_file
from policies.features import config_context_length, served_context
from policies.events import Event, merged
from policies.kv import KvAsk, KvShape, Usage
from policies.families import render_chat, stop_tokens
from policies.output_parser import OutputParser
from policies.constraints import Constraint, answer_constraint
from policies.tool_calls import FORMATS, ToolFormat
from policies.logs import module_logger

logger = module_logger(__name__)

# Saving the prompt cache must end within Serve's graceful shutdown (20 s by default), which
# also covers the replica's drain: what is not saved by then is left out, oldest first.
SAVE_SECONDS = 10.0


def measure_kv_shape(model) -> KvShape:
    """What one more token adds to each layer's cache, measured on the model's own caches
    (MLX thread): every family, dtype and cache type sized by what mlx-lm allocates.

    Keys and values (quantized ones too) are laid out (..., tokens, dim); caches without
    them (recurrent state) do not grow with tokens."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=cache))
    layers = []
    for layer in cache:
        arrays = [a for _, a in tree_flatten([getattr(layer, "keys", None), getattr(layer, "values", None)])]
        per_token = sum(a.nbytes // a.shape[-2] for a in arrays if isinstance(a, mx.array) and a.ndim >= 2)
        layers.append((per_token, getattr(layer, "max_size", None)))
    return KvShape(tuple(layers))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class TextModel(GenerativeServer):
    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.model = None
        self.tokenizer = None
        self.engine: BatchEngine | None = None
        self.adapters = None  # deployments.lora.Adapters, once the model is loaded
        self.context_length: int | None = None
        self.kv_shape: KvShape | None = None
        # A `memory:` override is the model's whole cost: nothing to hold on top of it.
        self.kv = None if entry.memory_bytes is not None else KvHold(
            self._ask_controller,
            self._prompt_cache_bytes,
            self._shrink_prompt_cache,
            self._free_unused,
            config.load_wait_timeout,
        )
        self.prompt_cache_bytes = config.prompt_cache_size or 0
        self.gguf_cache_dir = config.gguf_cache_dir
        self.gguf_dequantize = config.gguf_dequantize
        self.grammar_tokenizer: GrammarTokenizer | None = None
        self.prompt_store_dir = Path(config.prompt_cache_dir).expanduser()
        self.prompt_store_bytes = config.prompt_cache_disk or 0
        self.prompt_store: PromptStore | None = None
        self._controller: DeploymentHandle | None = None  # looked up on first use

    async def __del__(self) -> None:
        """Serve's graceful shutdown of the replica (eviction, idle TTL, admin unload): the
        prompt cache goes to disk, for the model's next load to start warm."""
        if self.prompt_store is None or self.engine is None or not self.engine.prompt_cache:
            return
        cache = self.engine.prompt_cache
        logger.info(
            "model %s: saving %d prompt cache entries (%.1f MB) to %s",
            self.entry.id, len(cache), cache.nbytes / 1e6, self.prompt_store.directory,
        )
        save = partial(self.prompt_store.save, deadline=time.monotonic() + SAVE_SECONDS)
        try:
            # The save checks its deadline between entries; the wait also covers the entry
            # being written then, and a generation step still finishing on the MLX thread.
            report = await asyncio.wait_for(self.run_mlx(self.engine.using_prompt_cache, save), SAVE_SECONDS + 5)
        except Exception:
            logger.exception("model %s: saving the prompt cache failed", self.entry.id)
            return
        logger.info(
            "model %s: prompt cache saved in %.2f s: %d entries on disk (%d written now, %.1f MB), "
            "%d left out, %d old files removed for the disk bound",
            self.entry.id, report.seconds, report.entries, report.written, report.written_bytes / 1e6,
            report.left_out, report.deleted,
        )

    async def load_adapter(self, adapter: AdapterRef) -> int:
        """Load a LoRA adapter of this model (once), between two decode steps: its bytes."""
        if self.engine is None:  # a replica that replaced one that died: the base first
            await self.load()
        return await asyncio.wrap_future(self.engine.between_steps(partial(self._load_adapter, adapter)))

    async def unload_adapter(self, adapter_id: str) -> None:
        """Drop an adapter no request uses (the controller asks only then), between two
        decode steps like a load (layers restack the others); its prompt cache ages out."""
        if self.engine is not None:
            await asyncio.wrap_future(self.engine.between_steps(partial(self.adapters.unload, adapter_id)))

    def state(self) -> ReplicaState:
        state = super().state()
        return replace(state, adapters=dict(self.adapters.loaded) if self.adapters is not None else {})

    async def count_tokens(self, job: GenerationRequest, lease_id: str) -> int:
        """The prompt's length in tokens, as a generation would read it."""
        async with self.serving(lease_id):
            prompt, _ = await asyncio.to_thread(self._prompt_tokens, job)
        return len(prompt)

    async def events(self, job: GenerationRequest) -> AsyncIterator[list[Event]]:
        # Templates, tokenizers and grammar compilation are plain Python or Rust over the
        # whole request: not on the event loop.
        prompt, in_reasoning = await asyncio.to_thread(self._prompt_tokens, job)
        max_tokens = token_budget(
            self.entry.id, job.sampling.max_tokens, len(prompt), self.context_length, self.default_max_tokens,
            job.sampling.max_tokens_param,
        )
        reserved = (
            nullcontext()
            if self.kv is None
            else self.kv.reserve(self.kv_shape.bytes_for(len(prompt) + max_tokens))
        )
        if job.adapter is not None and job.adapter.id not in self.adapters.loaded:
            await self.load_adapter(job.adapter)  # this replica replaced the one that had it
        async with reserved:
            async for batch in self._generate(job, prompt, max_tokens, in_reasoning):
                yield batch

    async def _generate(
        self, job: GenerationRequest, prompt: list[int], max_tokens: int, in_reasoning: bool
    ) -> AsyncIterator[list[Event]]:
        constraint = answer_constraint(job.constraint, job.tools, self._tool_format)
        mask = await asyncio.to_thread(self._grammar_mask, constraint) if constraint else None
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        sequence = Sequence(
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=job.sampling,
            emit=lambda item: loop.call_soon_threadsafe(steps.put_nowait, item),
            processors=[mask] if mask else [],
            logprobs=job.logprobs,
            adapter=job.adapter.id if job.adapter is not None else None,
        )
        self.engine.submit(sequence)
        tracker = CompletionTracker(
            job.sampling.stop, self._output_parser(job, in_reasoning) if job.chat else None, max_tokens
        )
        try:
            while not tracker.finished:
                # Take every step that is already waiting: when tokens come faster than
                # chunks travel, one chunk carries several tokens.
                batch = [await steps.get()]
                while not steps.empty():
                    batch.append(steps.get_nowait())
                events: list[Event] = []
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    events += tracker.feed(item)
                    if tracker.finished:
                        break
                if mask is not None and mask.error:
                    raise RuntimeError(f"constrained decoding failed: {mask.error}")
                if events:
                    yield merged(events)
        finally:
            sequence.cancelled = True  # the engine drops it from the batch, if still there

    def usage(self) -> Usage | None:
        if self.kv is None or self.engine is None:
            return None
        # Measured only while nothing runs: then the process holds just the prompt cache.
        idle = not self.kv.sequences
        process = self.resident_bytes() - self._prompt_cache_bytes() if idle else None
        speculation = self.engine.speculation
        return self.kv.usage(process, self.kv_shape.bytes_per_token, replace(speculation) if speculation else None)

    async def _ask_controller(self, ask: KvAsk) -> int | None:
        if self._controller is None:
            self._controller = serve.get_deployment_handle(CONTROLLER_NAME, serve.get_replica_context().app_name)
        try:
            return await self._controller.hold.remote(self.entry.id, ask)
        except Exception as error:
            if find_api_error(error) is not None:
                raise
            raise controller_unavailable(type(error).__name__) from None

    def _prompt_cache_bytes(self) -> int:
        return self.engine.prompt_cache_bytes() if self.engine is not None else 0

    async def _shrink_prompt_cache(self, max_bytes: int) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shrink_prompt_cache, max_bytes)

    async def _free_unused(self) -> None:
        import mlx.core as mx

        await self.run_mlx(mx.clear_cache)

    def _output_parser(self, job: GenerationRequest, in_reasoning: bool) -> OutputParser:
        # Without tools offered nothing is a call (a Llama answer opening with "{" is text).
        tool_format = self._tool_format if job.tools else None
        return OutputParser(tool_format, self.entry.think, in_reasoning)

    @property
    def _tool_format(self) -> ToolFormat | None:
        return FORMATS[self.entry.tool_format] if self.entry.tool_format else None

    # -- MLX thread -----------------------------------------------------------------------

    def _load(self) -> None:
        from mlx_lm import load

        path = self._mlx_lm_folder(self.entry.path)
        self.model, self.tokenizer, model_config = load(path, return_config=True)
        # As the catalog has it (from the files at start), or, for a model only downloaded
        # now, from the config that came with it: by the same rule either way.
        self.context_length = self.entry.context_length or served_context(
            config_context_length(model_config), self.entry.max_context
        )
        # Templates end a turn with a token the tokenizer may not list as EOS (<|eot_id|>,
        # <end_of_turn>): without it generation runs past the answer until max_tokens.
        vocab = self.tokenizer.get_vocab()
        for token in stop_tokens(self.adapter, self.tokenizer.chat_template):
            if token in vocab:
                self.tokenizer.add_eos_token(token)
        from deployments.lora import Adapters

        self.adapters = Adapters(self.model)
        self.engine = BatchEngine(
            self.model,
            self.tokenizer,
            self._mlx,
            partial(make_sampler, self.adapter),
            prompt_cache_bytes=self.prompt_cache_bytes,
            adapters=self.adapters,
            **self._speculation(),
        )
        self.kv_shape = measure_kv_shape(self.model)
        if self.prompt_store_bytes and self.engine.prompt_cache is not None:
            self.prompt_store = PromptStore(
                self.prompt_store_dir, model_key(self.entry.deployment, path), self.prompt_store_bytes
            )

    def _mlx_lm_folder(self, path: str) -> str:
        """The folder mlx-lm loads: the model's own, or the one its GGUF file converts into."""
        gguf = gguf_file(path)
        return path if gguf is None else str(converted_model_dir(gguf, self.gguf_cache_dir, self.gguf_dequantize))

    def _speculation(self) -> dict[str, Any]:
        """How decoding speculates (BatchEngine's options): with the draft model's weights,
        loaded here beside the model's (and charged with them), by prompt lookup, or not
        at all where a KV cache cannot be rewound row by row."""
        from deployments.speculation import can_speculate

        if self.entry.draft_path is None and self.entry.speculative != "prompt_lookup":
            return {}
        if not can_speculate(self.model):
            logger.info("model %s: its KV cache cannot be rewound row by row; decoding does not speculate", self.entry.id)
            return {}
        if self.entry.draft_path is None:
            return {"speculate": True}
        from mlx_lm import load

        draft, tokenizer = load(self._mlx_lm_folder(self.entry.draft_path))
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"its draft {self.entry.draft} has another vocabulary; a draft must share its tokenizer")
        if not can_speculate(draft):
            logger.info("model %s: its draft's KV cache cannot be rewound row by row; it is not used", self.entry.id)
            return {}
        logger.info("model %s: draft %s loaded; it proposes the next tokens", self.entry.id, self.entry.draft)
        return {"draft": draft}

    async def _after_load(self, report: LoadReport) -> LoadReport:
        """Read back the prompt cache saved when the model was last unloaded, as far as the
        controller lets the model hold it."""
        if self.prompt_store is None:
            return report
        started = time.perf_counter()
        try:
            files = self.prompt_store.restorable(self.prompt_cache_bytes, self.engine.prompt_cache.max_size)
            wanted = sum(f.size for f in files)
            if files and self.kv is not None and not await self.kv.admit_prompt_cache(wanted):
                logger.info(
                    "model %s: no room now for its saved prompt cache (%d entries, %.1f MB); starting cold",
                    self.entry.id, len(files), wanted / 1e6,
                )
                return report
            restore = partial(self.prompt_store.restore, files=files)
            restored = await self.run_mlx(self.engine.using_prompt_cache, restore)
        except Exception:  # a cold start is still a start
            logger.exception("model %s: restoring the prompt cache failed", self.entry.id)
            return report
        logger.info(
            "model %s: restored %d prompt cache entries (%.1f MB) in %.2f s%s",
            self.entry.id, restored.entries, restored.bytes / 1e6, restored.seconds,
            f"; {restored.unreadable} unreadable files removed" if restored.unreadable else "",
        )
        # Loaded includes restored; what the replica holds now includes the cache.
        return replace(report, seconds=report.seconds + time.perf_counter() - started, usage=self.usage())

    # -- prompt ---------------------------------------------------------------------------

    def _prompt_tokens(self, job: GenerationRequest) -> tuple[list[int], bool]:
        """The prompt's tokens, and whether it leaves the model inside its think block (as
        templates that open `<think>` for the model do)."""
        tokenizer = self.tokenizer
        if job.prompt is not None:
            return tokenizer.encode(job.prompt), False
        if not tokenizer.has_chat_template:
            raise ApiError(400, f"Model {self.entry.id} has no chat template; use /v1/completions")
        kwargs = dict(job.template_kwargs)
        if job.constraint is not None and self.entry.think:
            # The grammar governs the whole answer, which leaves no room for thinking first.
            kwargs.setdefault("enable_thinking", False)
        messages, tools = job.messages, job.tools
        tool_format = self._tool_format
        if tool_format is not None and tool_format.prompt is not None:  # the template renders no tools
            messages, tools = tool_format.prompt(messages, tools), []
        try:
            rendered = render_chat(self.adapter, tokenizer, messages, tools, kwargs)
        except Exception as error:  # the template's own raise_exception(), e.g. role order
            raise ApiError(
                400, f"Model {self.entry.id} cannot format these messages: {error}", param="messages"
            ) from None
        in_reasoning = bool(self.entry.think) and rendered.rstrip().endswith(self.entry.think[0])
        # The template writes BOS itself; encoding must not add a second one.
        return tokenizer.encode(rendered, add_special_tokens=False), in_reasoning

    def _load_adapter(self, adapter: AdapterRef) -> int:
        if adapter.id not in self.adapters.loaded:
            started = time.perf_counter()
            self.adapters.load(adapter.id, adapter.path)
            logger.info(
                "model %s: loaded adapter %s in %.3f s (%.1f MB)",
                self.entry.id, adapter.id, time.perf_counter() - started, self.adapters.loaded[adapter.id] / 1e6,
            )
        return self.adapters.loaded[adapter.id]

    def _grammar_mask(self, constraint: Constraint) -> GrammarMask:
        if self.grammar_tokenizer is None:
            self.grammar_tokenizer = GrammarTokenizer(self.tokenizer)
        return self.grammar_tokenizer.mask(constraint, self._tool_format)
