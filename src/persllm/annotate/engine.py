"""The annotation engine: user inputs, follow-ups and chain-of-thought golden replies, one dialogue at a time.

Every call goes through the backend it is given (in a run, a ``CachedBackend`` over the project's
SQLite cache). A malformed output is retried with a new sample number, up to ``annotate.max_attempts``
times, then raised as ``Malformed``; ``dialogue`` turns that into ``None`` so it is counted, never written.
"""

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from persllm.annotate import prompts
from persllm.annotate.parse import (
    Malformed,
    clean_analysis,
    clean_response,
    clean_user_input,
    parse_delimited_reply,
    parse_json_reply,
    parse_topic,
    topic_question,
)
from persllm.annotate.plan import STANCE_ORDER, Item, unit
from persllm.annotate.retrieval import RetrievalQueue
from persllm.config import AnnotateConfig, LLMConfig, PersonaConfig, StageConfig, Workspace
from persllm.errors import UserError
from persllm.index.retrieve import Context, Retriever
from persllm.llm.base import ChatBackend, Completion
from persllm.persona.corpus import Chunk, reply_cut

T = TypeVar("T")
TAG = "annotate"
TOPIC_TOKENS = 32  # a topic is a short phrase; a longer answer is the model rambling


@dataclass
class Reply:
    """A golden reply: the private analysis, the in-character content and the context it was grounded in.

    ``output`` says how it was obtained: ``json``, ``delimited`` or ``two_step``.
    """

    analysis: str
    content: str
    context: Context
    output: str = ""

    def turn(self) -> dict[str, str]:
        """The assistant turn of an annotation record."""
        return {"role": "assistant", "analysis": self.analysis, "content": self.content}


@dataclass
class Stats:
    """What the engine has spent and rejected so far (read by the progress bar and the run summary)."""

    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    follow_ups_dropped: int = 0

    def add(self, completion: Completion) -> None:
        self.calls += 1
        self.cached += completion.cached
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def attempt_modes(output: str, max_attempts: int, json_ok: bool) -> list[str]:
    """The output format of each attempt.

    ``auto`` uses JSON-schema output where the backend has it; otherwise labelled delimiters on the
    first attempt and the two-call fallback on the rest (what small local models manage).
    """
    if output == "json" and not json_ok:
        raise UserError(
            "annotate.output: 'json' needs a backend with JSON-schema output (annotator.backend: openai or "
            "llamacpp, structured_output not 'off'); use 'auto', 'delimited' or 'two_step'"
        )
    if output == "auto":
        return ["json"] * max_attempts if json_ok else ["delimited"] + ["two_step"] * (max_attempts - 1)
    return [output] * max_attempts


def sample_number(n_sample: int, attempt: int) -> int:
    """The cache's sample number of one attempt: retries are new samples, distinct from other callers'."""
    return n_sample * 100 + attempt


def default_stance(seed: Chunk, n_sample: int) -> str:
    return STANCE_ORDER[int(unit(f"{seed.id}:{n_sample}:stance") * len(STANCE_ORDER))]


class Annotator:
    """Writes dialogues for one project with one annotator backend.

    Args:
        workspace: the project's personas and run folder.
        annotator: the annotator model's settings; annotate: the ``annotate`` section.
        backend: the annotator model; pass a ``CachedBackend`` to make re-runs free.
        retriever: retrieval over the project's index, for the knowledge and style contexts.
        params: sampling params of every call (default: ``annotator.params``).
    """

    def __init__(
        self,
        workspace: Workspace,
        annotator: LLMConfig,
        annotate: AnnotateConfig,
        backend: ChatBackend,
        retriever: Retriever,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.workspace = workspace
        self.annotator = annotator
        self.backend = backend
        self.retriever = retriever
        self.cfg = annotate
        base = annotator.params if params is None else params
        self.params = {key: value for key, value in base.items() if value is not None}
        self.stats = Stats()
        self.retrieval = RetrievalQueue(retriever)

    # ------------------------------------------------------------------ public calls

    async def user_input(
        self,
        persona_id: str,
        stage_id: str,
        kind: str,
        seed: Chunk,
        n_sample: int = 0,
        stance: str | None = None,
    ) -> str:
        """The opening user message of a dialogue of ``kind`` about ``seed``, told the stage's time.

        ``stance`` (opinion only: agree, differ, conflict) defaults to one drawn from the seed and sample.
        """
        persona, stage = self._spec(persona_id, stage_id)
        messages = prompts.build_user_input_messages(
            persona, stage, kind, seed.text, stance or default_stance(seed, n_sample)
        )

        async def attempt(number: int, _mode: str) -> str:
            completion = await self._call(messages, sample_number(n_sample, number))
            return clean_user_input(completion.text, persona.name, completion.finish_reason == "length")

        return await self._retry(attempt)

    async def follow_up(
        self, persona_id: str, stage_id: str, kind: str, turns: list[dict[str, Any]], n_sample: int = 0
    ) -> str:
        """The user's next message: a follow-up, a challenge, or (misleading) another attempt to mislead."""
        persona, stage = self._spec(persona_id, stage_id)
        messages = prompts.build_follow_up_messages(persona, stage, kind, turns)

        async def attempt(number: int, _mode: str) -> str:
            completion = await self._call(messages, sample_number(n_sample, number))
            return clean_user_input(completion.text, persona.name, completion.finish_reason == "length")

        return await self._retry(attempt)

    async def reply(
        self,
        persona_id: str,
        stage_id: str,
        turns: list[dict[str, Any]],
        seed: Chunk | None = None,
        n_sample: int = 0,
    ) -> Reply:
        """The persona's in-character reply (with its analysis) to the last user turn of ``turns``.

        Context is retrieved fresh for the last user message from ``stage_id``'s material, ``seed``
        first. To regenerate an answer *as another stage* (or another persona), for preference pairs,
        call this with that stage (or persona) and ``seed=None``: the seed would carry the original
        stage's material into the prompt. Raises ``Malformed`` when every attempt was malformed.
        """
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("reply() needs a dialogue that ends with a user turn")
        persona, stage = self._spec(persona_id, stage_id)
        context = await self.retrieval.retrieve(persona_id, stage_id, turns[-1]["content"], seed)
        knowledge, style = context.knowledge_text(), context.style_text()

        async def attempt(number: int, mode: str) -> Reply:
            sample = sample_number(n_sample, number)
            if mode == "two_step":
                analysis, content = await self._two_step(persona, stage, turns, knowledge, style, sample)
            else:
                analysis, content = await self._one_call(
                    persona, stage, turns, knowledge, style, sample, mode
                )
            return Reply(analysis, content, context, mode)

        return await self._retry(attempt)

    async def back_question(
        self, persona_id: str, stage_id: str, kind: str, passage: str, n_sample: int = 0
    ) -> str:
        """The user turn that ``passage`` (the person's own words) answers: a question or an opinion.

        With ``annotate.question_style`` ``topic`` the annotator only names the passage's topic and a
        template turns it into the user turn (see ``parse.topic_question``).
        """
        persona, stage = self._spec(persona_id, stage_id)
        style = self.cfg.resolved_question_style(self.annotator.model)
        messages = prompts.build_user_turn_messages(persona, stage, kind, passage, style)

        async def attempt(number: int, _mode: str) -> str:
            extra = {"max_tokens": TOPIC_TOKENS} if style == "topic" else None
            completion = await self._call(messages, sample_number(n_sample, number), extra)
            if style == "topic":
                pick = unit(f"{passage}:{kind}:{n_sample}:template")
                return topic_question(parse_topic(completion.text), kind, pick)
            return clean_user_input(completion.text, persona.name, completion.finish_reason == "length")

        return await self._retry(attempt)

    async def own_words_analysis(
        self, persona_id: str, stage_id: str, question: str, reply: str, n_sample: int = 0
    ) -> str:
        """Short private notes leading from ``question`` to the person's own ``reply``."""
        persona, stage = self._spec(persona_id, stage_id)
        messages = prompts.build_own_words_analysis_messages(persona, stage, question, reply)

        async def attempt(number: int, _mode: str) -> str:
            completion = await self._call(messages, sample_number(n_sample, number))
            return clean_analysis(completion.text, completion.finish_reason == "length")

        return await self._retry(attempt)

    async def own_words(self, item: Item) -> dict[str, Any] | None:
        """The record of an own-words or held-out item: a back-written user turn, the passage as the reply.

        Held-out items get no analysis (they are evaluation references); own-words items get one when
        ``annotate.own_words_analysis`` is on. None when the question stayed malformed.
        """
        reply = reply_cut(item.seed.text, self.cfg.own_words_max_words)
        try:
            question = await self.back_question(
                item.persona, item.stage, item.kind, item.seed.text, item.index
            )
            analysis = ""
            if item.source == "own_words" and self.cfg.own_words_analysis:
                analysis = await self.own_words_analysis(
                    item.persona, item.stage, question, reply, item.index
                )
        except Malformed:
            return None
        turns = [
            {"role": "user", "content": question},
            {"role": "assistant", "analysis": analysis, "content": reply},
        ]
        return self.record(item, turns, Context(item.persona, item.stage, question), ["own_words"])

    async def dialogue(self, item: Item) -> dict[str, Any] | None:
        """One annotation record for ``item``, or None when its opening exchange stayed malformed.

        A follow-up that stays malformed ends the dialogue early: the exchanges before it are kept.
        """
        if item.source != "annotator":
            return await self.own_words(item)
        try:
            first = await self.user_input(
                item.persona, item.stage, item.kind, item.seed, item.index, item.stance
            )
            turns: list[dict[str, Any]] = [{"role": "user", "content": first}]
            opening = await self.reply(item.persona, item.stage, turns, item.seed, item.index)
        except Malformed:
            return None
        turns.append(opening.turn())
        outputs = {opening.output}
        for _ in range(item.follow_ups):
            try:
                question = await self.follow_up(item.persona, item.stage, item.kind, turns, item.index)
                answer = await self.reply(
                    item.persona,
                    item.stage,
                    [*turns, {"role": "user", "content": question}],
                    item.seed,
                    item.index,
                )
            except Malformed:
                self.stats.follow_ups_dropped += 1
                break
            turns += [{"role": "user", "content": question}, answer.turn()]
            outputs.add(answer.output)
        return self.record(item, turns, opening.context, sorted(outputs))

    def record(
        self, item: Item, turns: list[dict[str, Any]], context: Context, outputs: list[str]
    ) -> dict[str, Any]:
        """The DESIGN.md annotation record."""
        return {
            "id": item.id,
            "persona": item.persona,
            "stage": item.stage,
            "kind": item.kind,
            "seed": {"source": item.seed.kind, "ref": item.seed.ref, "text": item.seed.text},
            "turns": turns,
            "reply": self.reply_source(item),
            "context": {"knowledge": context.knowledge_text(), "style": context.style_text()},
            "annotator": {
                "backend": self.backend.name,
                "model": self.backend.model_id,
                "params": dict(self.params),
                "output": "+".join(outputs),
            },
        }

    def reply_source(self, item: Item) -> dict[str, str]:
        """Where the record's reply came from; own words also say their passage and how the question was
        written (``question`` by the annotator, or ``topic`` + template)."""
        if item.source == "annotator":
            return {"source": "annotator"}
        style = self.cfg.resolved_question_style(self.annotator.model)
        return {"source": item.source, "ref": item.seed.ref, "question": style}

    # ------------------------------------------------------------------ helpers

    def modes(self) -> list[str]:
        # Asked per reply: an OpenAI-compatible server may turn out not to support JSON schema mid-run.
        json_ok = self.backend.supports_json_schema and self.annotator.structured_output != "off"
        return attempt_modes(self.cfg.output, self.cfg.max_attempts, json_ok)

    async def _one_call(
        self,
        persona: PersonaConfig,
        stage: StageConfig,
        turns: list[dict[str, Any]],
        knowledge: str,
        style: str,
        sample: int,
        mode: str,
    ) -> tuple[str, str]:
        messages = prompts.build_reply_messages(persona, stage, turns, knowledge, style, mode)
        extra = {"response_format": prompts.REPLY_FORMAT} if mode == "json" else {}
        completion = await self._call(messages, sample, extra)
        parse = parse_json_reply if mode == "json" else parse_delimited_reply
        return parse(completion.text, persona.name, completion.finish_reason == "length")

    async def _two_step(
        self,
        persona: PersonaConfig,
        stage: StageConfig,
        turns: list[dict[str, Any]],
        knowledge: str,
        style: str,
        sample: int,
    ) -> tuple[str, str]:
        first = await self._call(prompts.build_analysis_messages(persona, stage, turns, knowledge), sample)
        analysis = clean_analysis(first.text, first.finish_reason == "length")
        messages = prompts.build_response_messages(persona, stage, turns, knowledge, style, analysis)
        second = await self._call(messages, sample)
        return analysis, clean_response(second.text, persona.name, second.finish_reason == "length")

    async def _call(
        self, messages: list[dict[str, str]], sample: int, extra: dict[str, Any] | None = None
    ) -> Completion:
        params = {**self.params, **(extra or {}), "n_sample": sample, "tag": TAG}
        completion = await self.backend.generate(messages, params)
        self.stats.add(completion)
        return completion

    async def _retry(self, attempt: Callable[[int, str], Awaitable[T]]) -> T:
        failure: Malformed | None = None
        for number, mode in enumerate(self.modes()):
            try:
                return await attempt(number, mode)
            except Malformed as exc:
                self.stats.malformed[exc.reason] += 1
                failure = exc
        assert failure is not None  # max_attempts >= 1
        raise failure

    def _spec(self, persona_id: str, stage_id: str) -> tuple[PersonaConfig, StageConfig]:
        persona = self.workspace.persona(persona_id)
        return persona, persona.stage(stage_id)
