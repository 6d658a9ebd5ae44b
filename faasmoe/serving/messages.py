"""The messages of a request's life, defined once: scheduler events, and private mode's IPC.

In one process they pass as objects (the scheduler calls a request's `emit` with them); between the
server and a private-mode orchestrator they travel as JSON lines, one message per line, and are parsed
back into the same types, so neither side rebuilds the other's dicts.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from faasmoe.control.sequence import SamplingParams


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


class Usage(_Message):
    prompt_tokens: int
    completion_tokens: int


class TextEvent(_Message):
    """Tokens made in one step and the text they completed. The text may be empty (a partial character or the
    start of a stop string is held back); usage is counted from `tokens` as they are made, however the
    request ends."""

    type: Literal["text"] = "text"
    text: str
    tokens: int
    ids: list[int] = []


class DoneEvent(_Message):
    """A request's last event, always, exactly once."""

    type: Literal["done"] = "done"
    finish_reason: str  # stop, length, cancelled, error
    usage: Usage
    error: str | None = None
    cold_prefill: bool | None = None  # a function cold-started during the step that made the first token


Event = Union[TextEvent, DoneEvent]


# -- private mode: server <-> orchestrator, one connection per request ------------------------------------
class Submit(_Message):
    type: Literal["submit"] = "submit"
    id: str
    tenant: str
    prompt_ids: list[int]
    params: SamplingParams


class Cancel(_Message):
    """The client went away: end the request; its final event, with every token made, still follows."""

    type: Literal["cancel"] = "cancel"


class Accepted(_Message):
    type: Literal["accepted"] = "accepted"


class Rejected(_Message):
    type: Literal["rejected"] = "rejected"
    status: int  # 400: the model cannot serve it; 429: no room
    message: str
    code: str | None = None  # the OpenAI error code of a 400, where one fits
    param: str | None = None  # the request field at fault


ToOrchestrator = TypeAdapter(Annotated[Union[Submit, Cancel], Field(discriminator="type")])
FromOrchestrator = TypeAdapter(Annotated[Union[Accepted, Rejected, TextEvent, DoneEvent], Field(discriminator="type")])
