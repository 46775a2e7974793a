"""Vision chat with mlx-vlm: images and text in message order, plain or streamed."""

from __future__ import annotations

from typing import AsyncIterator, Iterator

from ray import serve

from deployments.batching import Step
from policies.errors import ApiError
from policies.generation import GenerationRequest, token_budget
from deployments.generative import GenerativeServer, completion_events, make_sampler
from policies.events import Event
from policies.config import AppConfig, ModelEntry

# Families whose models were trained with a single image per conversation.
SINGLE_IMAGE_FAMILIES = {"llava", "paligemma", "florence2"}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class VisionModel(GenerativeServer):
    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.model = None
        self.processor = None

    async def events(self, job: GenerationRequest) -> AsyncIterator[list[Event]]:
        if len(job.images) > 1 and self.entry.family in SINGLE_IMAGE_FAMILIES:
            raise ApiError(
                400,
                f"Model {self.entry.id} ({self.entry.family}) accepts one image per request; "
                f"got {len(job.images)}",
                param="messages",
            )
        async for event in self.iterate_mlx(lambda: self._events(job)):
            yield [event]

    # -- MLX thread -----------------------------------------------------------------------

    def _load(self) -> None:
        from mlx_vlm import load

        self.model, self.processor = load(self.entry.path)

    def _events(self, job: GenerationRequest) -> Iterator[Event]:
        from mlx_vlm import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template

        try:
            prompt = apply_chat_template(
                self.processor, self.model.config, job.messages, num_images=len(job.images)
            )
        except Exception as error:  # the template's own refusals
            raise ApiError(
                400, f"Model {self.entry.id} cannot format these messages: {error}", param="messages"
            ) from None
        # mlx-vlm does not say the model's context: an answer is capped, not sized to the rest.
        max_tokens = token_budget(self.entry.id, job.sampling.max_tokens, 0, None, self.default_max_tokens)
        results = stream_generate(
            self.model,
            self.processor,
            prompt,
            image=job.images or None,
            max_tokens=max_tokens,
            sampler=make_sampler(self.adapter, job.sampling),
        )
        # mlx-vlm yields one result per generated token, then a last one that only flushes
        # text and carries the finish reason.
        steps = (
            Step(r.text, 0 if r.finish_reason else 1, r.finish_reason, r.prompt_tokens)
            for r in results
        )
        return completion_events(steps, job.sampling.stop, max_tokens)
