"""Mistral's instruct formats (v1, v3, v7): one user turn as text or token ids, an assistant reply's ids, and a
conversation's turns with the system prompt where each format puts it. What `chat`, `generate --chat` and chat
fine-tuning data (chats.py) feed a model."""

from __future__ import annotations


def chat_template(prompt: str, system: str | None = None, fmt: str = "v1") -> str:
    """One user turn in Mistral's instruct format `fmt` (a tokenizer's instruct_format), as text.

    v1 (Mixtral-8x7B-Instruct; the markers are text): "[INST] {system}\n\n{prompt} [/INST]". v3 (tokenizer.model.v3,
    Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct; [INST] and [/INST] are control tokens, no spaces around
    them): "[INST]{system}\n\n{prompt}[/INST]". v7: "[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]".
    """
    return "".join(text for text, _ in _turn_parts(prompt, system, fmt))


def _turn_parts(prompt: str, system: str | None, fmt: str) -> list[tuple[str, bool]]:
    """A user turn as (text, is a control token) parts, in order."""
    if fmt == "v1":
        return [(f"[INST] {system}\n\n{prompt} [/INST]" if system else f"[INST] {prompt} [/INST]", False)]
    if fmt not in ("v3", "v7"):
        raise ValueError(f"unknown instruct format {fmt!r}")
    if fmt == "v7" and system:
        return [("[SYSTEM_PROMPT]", True), (system, False), ("[/SYSTEM_PROMPT]", True),
                ("[INST]", True), (prompt, False), ("[/INST]", True)]
    return [("[INST]", True), (f"{system}\n\n{prompt}" if system else prompt, False), ("[/INST]", True)]


def turn_ids(tok, prompt: str, system: str | None = None, bos: bool = False) -> list[int]:
    """Token ids of one user turn in tok's instruct format: what `chat`, `generate --chat` and chat fine-tuning
    data (chats.encode_conversation) feed a model. The markers of v3 and v7 are the control tokens' ids; the text
    between them is encoded on its own, so a message that spells "[INST]" stays text."""
    ids = [tok.bos_id] if bos else []
    for text, control in _turn_parts(prompt, system, tok.instruct_format):
        ids += [tok.control[text]] if control else tok.encode(text)
    return ids


def reply_ids(tok, text: str) -> list[int]:
    """Token ids of an assistant reply and its </s>, as Mistral's tokenizers encode one."""
    if tok.instruct_format != "v1":
        return tok.encode(text.rstrip(" "), eos=True)  # mistral-common strips trailing spaces from v2 on
    # SentencePiece puts a "▁" (a space) in front of every text it encodes, as Mistral's own tokenization of
    # replies has it; a byte-level BPE does not, so the space is written.
    return tok.encode(text if tok.kind == "mistral" else " " + text, eos=True)


def system_in_turn(fmt: str, turn: int, last: bool) -> bool:
    """Whether user turn `turn` (0, 1, ...) of a conversation carries the system prompt: the first turn in v1 and
    v7, the last one in v3 (as mistral-common renders them). `chat`, which keeps earlier turns in its cache, sends
    every turn as the last one: in v3 each of its turns carries the system prompt."""
    return last if fmt == "v3" else turn == 0


def chat_turns(messages: list[dict], fmt: str = "v1") -> list[tuple[str, str, str | None]]:
    """A conversation as (role, content, system prompt of this turn or None), in order, the system message
    (if it comes first) placed in the user turn that carries it in format `fmt`."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    return [(m["role"], m["content"], system if m["role"] == "user" and system_in_turn(
        fmt, users.index(i), i == users[-1]) else None) for i, m in enumerate(rest)]


def chat_segments(messages: list[dict]) -> list[tuple[str, str]]:
    """A whole conversation in the v1 template, as (text, role) segments in order: each user turn is
    chat_template(content, system) (the system prompt in front of the first one, as `chat` does), each
    assistant turn its content. Tokenized segment by segment (<s> before the first, </s> after each reply),
    it is the token sequence `chat` builds turn by turn."""
    return [(chat_template(content, system) if role == "user" else content, role)
            for role, content, system in chat_turns(messages)]
