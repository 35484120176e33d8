"""The inference engine: batched prefill and decode over a running batch of sequences.

`add` prefills new requests (with token merging if their acceleration asks for it) and joins
them to the running batch; `step` decodes one token for every running row (with KV compression
where enabled); finished and cancelled rows leave between steps. Not thread-safe: one engine
thread drives it (see scheduler.py); only `prepare` may run on other threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from PIL import Image

from lightvlm_core import forward
from lightvlm_core.detok import IncrementalDetokenizer
from lightvlm_core.errors import ImageError, InvalidRequestError, PromptTooLongError
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.kv.compress import KVCompressor
from lightvlm_core.loading import LoadedModel, load_model
from lightvlm_core.models.base import PromptInputs
from lightvlm_core.reduction import build_prefill_hook, resolve_acceleration
from lightvlm_core.sampling import make_generator, sample
from lightvlm_core.sequence import PreparedRequest, Sequence, StepOutput
from lightvlm_core.types import AccelerationConfig, GenerationRequest, GenerationResult, TokenEvent

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, loaded: LoadedModel, default_acceleration: AccelerationConfig | None = None) -> None:
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.device = loaded.device
        self.default_acceleration = resolve_acceleration(default_acceleration or AccelerationConfig())
        self.max_context = self.adapter.max_context
        self.eos_ids = _eos_ids(loaded.model, self.tokenizer)
        a = self.adapter
        self.cache = BatchedKVCache.empty(len(a.layers), a.num_kv_heads, a.head_dim, loaded.dtype, self.device)
        self.compressor = KVCompressor()
        self.running: list[Sequence] = []
        self.image_tokens_in = 0
        self.image_tokens_kept = 0
        self.last_prefill_ms = {"vision_ms": 0.0, "llm_ms": 0.0}  # split of the latest prefill

    # --- what the service reads -------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def dtype(self) -> str:
        return str(self.loaded.dtype).removeprefix("torch.")

    @property
    def num_running(self) -> int:
        return len(self.running)

    def kv_cache_bytes(self) -> int:
        return sum(self.cache.row_bytes()) if self.running else 0

    def kv_cache_tokens(self) -> int:
        return sum(self.cache.row_tokens()) if self.running else 0

    @property
    def evicted_tokens_total(self) -> int:
        return self.compressor.evicted_total

    @property
    def image_tokens_total(self) -> tuple[int, int]:
        return self.image_tokens_in, self.image_tokens_kept

    # --- request intake (any thread) ----------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validate and tokenise a request; raises InvalidRequestError subclasses for bad input."""
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string")
        images = [_checked_image(img) for img in request.images]
        if request.messages is not None:
            messages = _checked_messages(request.messages, len(images))
        else:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": request.prompt}]
            messages = [{"role": "user", "content": content}]
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # the model's own Jinja template rejected the conversation
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}") from exc
        try:
            inputs = self.processor(images=images or None, text=[text], return_tensors="pt")
        except (ValueError, OSError, TypeError) as exc:
            raise ImageError(f"could not process the image(s): {exc}") from exc
        input_ids = inputs["input_ids"][0]
        n = int(input_ids.shape[0])
        if n + 1 > self.max_context:
            raise PromptTooLongError(f"prompt has {n} tokens; the model's context is {self.max_context}")
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        prompt = PromptInputs(input_ids=input_ids, vision=vision, num_images=len(images))
        positions, next_position = self.adapter.position_ids(prompt)
        accel = resolve_acceleration(request.acceleration) if request.acceleration else self.default_acceleration
        num_image = int((input_ids == self.adapter.image_token_id).sum())
        return PreparedRequest(request, prompt, positions, next_position, accel, num_image)

    # --- the engine thread ----------------------------------------------------------------------

    def add(self, prepared: list[PreparedRequest]) -> list[StepOutput]:
        """Prefill `prepared` and join them to the running batch; returns their first tokens.

        Rows with the same acceleration are prefilled together. Nothing joins if anything fails.
        """
        groups: dict[tuple, list[PreparedRequest]] = {}
        for p in prepared:
            groups.setdefault(_accel_key(p.acceleration), []).append(p)
        new_caches, new_seqs, outputs = [], [], []
        for group in groups.values():
            cache, seqs, outs = self._prefill_group(group)
            new_caches.append(cache)
            new_seqs.extend(seqs)
            outputs.extend(outs)
        for cache in new_caches:
            self.cache.extend(cache)
        self.running.extend(new_seqs)
        self._retire(outputs)
        return outputs

    def step(self) -> list[StepOutput]:
        """Decode one token for every running row."""
        if not self.running:
            return []
        last = torch.tensor([s.token_ids[-1] for s in self.running], device=self.device)
        pos = torch.tensor([s.next_position - 1 for s in self.running], device=self.device)
        if self.adapter.uses_mrope:
            pos = pos.expand(3, -1)
        logits = forward.decode(self.adapter, self.cache, last, pos)
        tokens = sample(logits, [s.sampling for s in self.running], [s.generator for s in self.running])
        outputs = [seq.accept(tok) for seq, tok in zip(self.running, tokens)]
        self._track_kv_peak()
        self.compressor.after_step(self.cache, [s.prepared.acceleration.kv_budget for s in self.running])
        self._retire(outputs)
        return outputs

    def remove(self, request_id: str) -> None:
        keep = [i for i, s in enumerate(self.running) if s.request_id != request_id]
        if len(keep) != len(self.running):
            self._keep_rows(keep)

    def remove_all(self) -> None:
        self._keep_rows([])

    # --- convenience for the CLI, tests and benchmarks -----------------------------------------

    def stream(self, request: GenerationRequest) -> Iterator[StepOutput]:
        """Run one request alone (the batch must be idle), yielding its step outputs."""
        if self.running:
            raise RuntimeError("stream() needs an idle engine")
        outputs = self.add([self.prepare(request)])
        while True:
            yield from outputs
            if any(o.done for o in outputs) or not self.running:
                return
            outputs = self.step()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests together as one batch until all finish."""
        prepared = [self.prepare(r) for r in requests]
        tokens: dict[str, list[TokenEvent]] = {p.request_id: [] for p in prepared}
        results: dict[str, GenerationResult] = {}
        outputs = self.add(prepared)
        while True:
            for out in outputs:
                if out.token:
                    tokens[out.request_id].append(out.token)
                if out.done:
                    evs = tokens[out.request_id]
                    results[out.request_id] = GenerationResult(
                        text="".join(e.text for e in evs), token_ids=[e.token_id for e in evs],
                        finish_reason=out.done.finish_reason, usage=out.done.usage, timings=out.done.timings)
            if not self.running:
                break
            outputs = self.step()
        return [results[p.request_id] for p in prepared]

    # --- internals --------------------------------------------------------------------------------

    def _prefill_group(self, group: list[PreparedRequest]) -> tuple[BatchedKVCache, list[Sequence], list[StepOutput]]:
        start = time.monotonic()
        a, dtype = self.adapter, self.loaded.dtype
        embeds = a.embed_batch([p.prompt for p in group], self.device, dtype)
        self._sync()
        vision_end = time.monotonic()
        state = _pad_batch(group, embeds, a, self.device)
        hook = build_prefill_hook(group[0].acceleration, a, [p.num_image_tokens for p in group])
        budgeted = any(p.acceleration.kv_budget for p in group)
        h_last, cache, layer_lengths = forward.prefill(a, state, hook, kv_scores=budgeted)
        logits = forward.logits_for(a, h_last)
        seqs = [self._new_sequence(p, start) for p in group]
        tokens = sample(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        end = time.monotonic()
        self.last_prefill_ms = {"vision_ms": (vision_end - start) * 1e3, "llm_ms": (end - vision_end) * 1e3}
        outputs = []
        lengths = torch.stack(layer_lengths).tolist()  # (L, B)
        for row, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.prefill_end = end
            self._record_image_usage(seq, [lengths[layer][row] for layer in range(len(lengths))])
            outputs.append(seq.accept(tok))
        return cache, seqs, outputs

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _new_sequence(self, p: PreparedRequest, start: float) -> Sequence:
        seq = Sequence(
            prepared=p,
            detok=IncrementalDetokenizer(self.tokenizer, p.request.sampling.stop),
            generator=make_generator(p.request.sampling, self.device),
            eos_ids=self.eos_ids,
            max_context=self.max_context,
            prefill_start=start,
            next_position=p.next_position,
        )
        seq.usage.prompt_tokens = p.num_prompt_tokens
        seq.usage.image_tokens = p.num_image_tokens
        return seq

    def _record_image_usage(self, seq: Sequence, layer_lengths: list[int]) -> None:
        n_img = seq.prepared.num_image_tokens
        n_text = seq.prepared.num_prompt_tokens - n_img
        kept_per_layer = [n - n_text for n in layer_lengths]
        seq.usage.image_tokens_kept = kept_per_layer[-1]
        seq.usage.image_kept_fraction_layer_avg = (sum(kept_per_layer) / (len(kept_per_layer) * n_img)
                                                   if n_img else 1.0)
        seq.usage.kv_cache_bytes = sum(layer_lengths) * self.cache.bytes_per_entry()
        self.image_tokens_in += n_img
        self.image_tokens_kept += kept_per_layer[-1]

    def _track_kv_peak(self) -> None:
        for seq, nbytes in zip(self.running, self.cache.row_bytes()):
            seq.usage.kv_cache_bytes = max(seq.usage.kv_cache_bytes, nbytes)

    def _retire(self, outputs: list[StepOutput]) -> None:
        finished = {o.request_id for o in outputs if o.done}
        if finished:
            self._keep_rows([i for i, s in enumerate(self.running) if s.request_id not in finished])

    def _keep_rows(self, rows: list[int]) -> None:
        self.cache.select(rows)
        self.running = [self.running[i] for i in rows]
        if self.cache.scores is not None and not any(s.prepared.acceleration.kv_budget for s in self.running):
            self.cache.scores = None  # back to the fused attention path


def load_engine(model: str | None = None, device: str = "auto", dtype: str = "auto", preset: str = "none",
                trust_remote_code: bool = False) -> Engine:
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return Engine(loaded, AccelerationConfig(preset=preset))


def _pad_batch(group: list[PreparedRequest], embeds: list[torch.Tensor], adapter, device: torch.device
               ) -> forward.PrefillState:
    """Right-pad the prompts of a group into one PrefillState."""
    b, t, d = len(group), max(e.shape[0] for e in embeds), embeds[0].shape[-1]
    h = embeds[0].new_zeros(b, t, d)
    valid = torch.zeros(b, t, dtype=torch.bool, device=device)
    mrope = adapter.uses_mrope
    pos = torch.zeros((3, b, t) if mrope else (b, t), dtype=torch.long, device=device)
    span = torch.full((b, t), -1, dtype=torch.long, device=device)
    for row, (p, e) in enumerate(zip(group, embeds)):
        n = e.shape[0]
        h[row, :n] = e
        valid[row, :n] = True
        pos[..., row, :n] = p.positions.to(device)
        for i, (s, end) in enumerate(adapter.image_spans(p.prompt.input_ids)):
            span[row, s:end] = i
    size = torch.ones(b, t, dtype=torch.float32, device=device)
    return forward.PrefillState(h=h, valid=valid, pos=pos, span=span, size=size)


def _accel_key(a: AccelerationConfig) -> tuple:
    return (a.preset, a.keep_ratio)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _checked_messages(messages: list[dict], num_images: int) -> list[dict]:
    """Validate a chat conversation; the number of image parts must match the images given."""
    if not messages or messages[-1].get("role") != "user":
        raise InvalidRequestError("the last message must come from the user")
    parts = 0
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequestError(f"unknown message role {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, list):
            parts += sum(1 for part in content if part.get("type") == "image")
        elif not isinstance(content, str):
            raise InvalidRequestError("message content must be a string or a list of parts")
    if parts != num_images:
        raise InvalidRequestError(f"{parts} image parts in the messages but {num_images} images given")
    return messages


def _checked_image(img: object) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"image has no pixels ({img.width}x{img.height})")
    return img if img.mode == "RGB" else img.convert("RGB")
