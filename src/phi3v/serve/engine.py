"""The model behind the server: the base with its adapters, and a worker thread that batches queued requests.

Requests wait in a queue; the worker takes the first, lets others join for ``batch_wait_ms`` (up to
``max_batch_size``), groups them by model and sampling settings, and generates each group as one left-padded batch
through ``phi3v.eval.generate.generate_tokens``, the evaluation's own generation path. Adapters are PEFT adapters
loaded once on the one base; a group's adapter is switched in with ``set_adapter`` (the base alone runs with the
adapters disabled), so no switch reloads the base.

Everything that touches phi3v's processor and model loading sits in the three functions under "The phi3v layer",
so a change of those APIs is one edit here.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from phi3v.processing import Conversation, Phi3VProcessor
from phi3v.serve.config import ServeConfig
from phi3v.serve.protocol import ChatRequest

logger = logging.getLogger(__name__)

# -- The phi3v layer ---------------------------------------------------------------------------------------------


def load_model(config: ServeConfig) -> tuple[torch.nn.Module, Phi3VProcessor]:
    """The base model (with every adapter loaded under its name, none merged) and the base's processor."""
    from phi3v.eval.inference import load_for_inference

    model, processor = load_for_inference(config.model, dtype=config.dtype, device=config.device,
                                          num_crops=config.num_crops)  # fmt: skip
    if config.adapters:
        from peft import PeftModel

        names = list(config.adapters)
        model = PeftModel.from_pretrained(model, config.adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(config.adapters[name], adapter_name=name)
    return model.eval(), processor


def count_prompt_tokens(processor: Phi3VProcessor, conversation: Conversation) -> int:
    """Prompt length in tokens, image tokens included (no pixels are processed).

    Raises:
        ValueError: for image tags in the text that do not match the images.
    """
    return len(processor.render(conversation, generation=True).input_ids)


def generate(model, processor: Phi3VProcessor, conversations: list[Conversation], max_new_tokens: int,
             tracker: BatchTracker, sampling: dict) -> None:  # fmt: skip
    """One batch through the evaluation's generation path; the tracker sees every token."""
    from phi3v.eval.generate import generate_tokens

    generate_tokens(model, processor, conversations, max_new_tokens, streamer=tracker,
                    stopping_criteria=StoppingCriteriaList([tracker]), **sampling)  # fmt: skip


def byte_token_ids(processor: Phi3VProcessor) -> set[int]:
    """Ids of the tokenizer's byte-fallback tokens (``<0x41>``): a run of them decodes as one UTF-8 sequence, so
    its text is only final once a token of another kind follows."""
    vocab = processor.tokenizer.get_vocab()
    return {i for token, i in vocab.items() if BYTE_TOKEN.fullmatch(token)}


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# -- Batching ----------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (end token or a stop string) or "length"
    completion_tokens: int


@dataclass
class Job:
    """A queued request. ``on_text`` gets each new piece of the answer, ``on_done`` the ``Answer`` or the error;
    both are called on the worker thread."""

    request: ChatRequest
    on_text: Callable[[str], None]
    on_done: Callable[[Answer | BaseException], None]
    queued: float = field(default_factory=time.monotonic)


class BatchTracker(BaseStreamer, StoppingCriteria):
    """Follows each row of a batch as tokens come: decodes it, cuts it at a stop string or at its own
    ``max_tokens``, hands out the new text, and tells ``generate`` which rows are finished.

    ``generate`` calls ``put`` with the prompt first, then with each step's ``[B]`` new tokens, then the stopping
    criteria (this object too) with the ids so far.
    """

    def __init__(self, processor: Phi3VProcessor, jobs: list[Job], byte_ids: set[int]):
        self.processor, self.jobs, self.byte_ids = processor, jobs, byte_ids
        self.ends = set(processor.eos_token_ids)
        n = len(jobs)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n
        self.sent = [0] * n
        self.finish: list[str | None] = [None] * n
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finish[row] is not None:
                continue
            if token in self.ends:
                self._finish(row, "stop")
                continue
            self.tokens[row].append(token)
            request = self.jobs[row].request
            text = self.processor.decode(self.tokens[row])
            cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.texts[row] = text[:cut]
                self._finish(row, "stop")
            elif len(self.tokens[row]) >= request.max_tokens:
                self.texts[row] = text
                self._finish(row, "length")
            else:
                self.texts[row] = text
                self._send(row, self._stable(row, text) - _held_back(text, request.stop))

    def _stable(self, row: int, text: str) -> int:
        """How much of ``text`` later tokens cannot change: all but a trailing run of byte tokens' text."""
        tokens = self.tokens[row]
        run = len(tokens) - next((k for k in range(len(tokens) - 1, -1, -1) if tokens[k] not in self.byte_ids), -1) - 1
        return len(text) if run == 0 else len(self.processor.decode(tokens[: len(tokens) - run]))

    def end(self) -> None:
        for row in range(len(self.jobs)):
            if self.finish[row] is None:  # the batch's max_new_tokens is this row's max_tokens
                self._finish(row, "length")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def _finish(self, row: int, reason: str) -> None:
        self.finish[row] = reason
        self._send(row, len(self.texts[row]))

    def _send(self, row: int, upto: int) -> None:
        if upto > self.sent[row]:
            self.jobs[row].on_text(self.texts[row][self.sent[row] : upto])
            self.sent[row] = upto

    def answers(self) -> list[Answer]:
        return [Answer(t, f or "length", len(k)) for t, f, k in zip(self.texts, self.finish, self.tokens, strict=True)]


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not to send yet: the start of a possible stop string, or an unfinished
    multi-byte character (each of its bytes decodes as U+FFFD until the last byte token comes)."""
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(held, len(text) - len(text.rstrip("\ufffd")))


class Engine:
    """The loaded model and the worker thread that serves the queue."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.model, self.processor = load_model(config)
        self.names = [config.base_name, *config.adapters]
        self.byte_ids = byte_token_ids(self.processor)
        self.batch_sizes: list[int] = []  # every batch generated (its request count): the tests read it
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="phi3v-serve-worker", daemon=True)
        self._worker.start()

    def prompt_tokens(self, conversation: Conversation) -> int:
        return count_prompt_tokens(self.processor, conversation)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            deadline = time.monotonic() + self.config.batch_wait_ms / 1000
            while len(jobs) < self.config.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
            for group in _groups(jobs):
                self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        first = jobs[0].request
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} if first.sampling else {}
        tracker = BatchTracker(self.processor, jobs, self.byte_ids)
        self.batch_sizes.append(len(jobs))
        try:
            with self._adapter(first.model):
                if first.sampling and first.seed is not None:
                    torch.manual_seed(first.seed)  # a seeded request is a group of its own: its draws are its own
                generate(self.model, self.processor, [j.request.conversation for j in jobs],
                         max(j.request.max_tokens for j in jobs), tracker, sampling)  # fmt: skip
        except Exception as err:  # the server stays up; each request of the batch gets the error
            logger.exception("generation failed for a batch of %d", len(jobs))
            for job in jobs:
                job.on_done(err)
            return
        for job, answer in zip(jobs, tracker.answers(), strict=True):
            job.on_done(answer)

    def _adapter(self, name: str):
        if not self.config.adapters:
            return nullcontext()
        if name == self.config.base_name:
            return self.model.disable_adapter()
        return _set_adapter(self.model, name)


@contextmanager
def _set_adapter(model, name: str) -> Iterator[None]:
    model.set_adapter(name)
    yield


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that can share a batch: same model; greedy ones together whatever their lengths; sampled ones with the
    same temperature and top_p; a seeded sampled one alone."""
    groups: dict[tuple, list[Job]] = {}
    for k, job in enumerate(jobs):
        r = job.request
        key = (r.model, r.temperature, r.top_p, k if r.seed is not None else None) if r.sampling else (r.model,)
        groups.setdefault(key, []).append(job)
    return list(groups.values())
