"""Talking to a checkpoint: its chat template, streamed tokens, a history of turns (behind
`moe-hub chat`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .errors import MoEHubError


@dataclass
class GenerationOptions:
    """How replies are generated: greedy unless ``temperature`` > 0 (then sampled, with
    ``top_p`` nucleus filtering)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise MoEHubError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise MoEHubError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise MoEHubError(f"--top-p must be in (0, 1] (got {self.top_p})")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True,
                "temperature": self.temperature, "top_p": self.top_p}


def load_chat_model(checkpoint: str | os.PathLike, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint, in eval mode; refuses a tokenizer without a chat
    template (a base model's: there is no turn format to follow)."""
    from transformers import AutoTokenizer

    from .checkpoint import require_checkpoint
    from .modeling import MoELoraConfig, MoELoraForCausalLM

    if os.path.exists(checkpoint):  # else a Hub repo id, which from_pretrained resolves
        require_checkpoint(checkpoint)
    try:
        config = MoELoraConfig.from_pretrained(checkpoint)
    except OSError as err:
        raise MoEHubError(f"{checkpoint} is not a moe-hub checkpoint ({err})") from None
    # The dense config tells AutoTokenizer the tokenizer class without resolving the
    # checkpoint's auto_map (which would ask whether to run its code).
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, config=config.text_config)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise MoEHubError(f"{checkpoint} has no usable tokenizer files "
                          f"({err.__class__.__name__})") from None
    if not tokenizer.chat_template:
        raise MoEHubError(f"{checkpoint}'s tokenizer has no chat template: chat needs an "
                          f"instruction-tuned base (convert one that ships a chat template)")
    model = MoELoraForCausalLM.from_pretrained(checkpoint, **({"dtype": dtype} if dtype else {}))
    return model.eval(), tokenizer


@dataclass
class Conversation:
    """A history of turns that each reply extends."""

    model: Any
    tokenizer: Any
    system: str | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, prompt: str, stream: TextIO | None = None) -> str:
        """Add ``prompt`` as the user's turn, generate the assistant's turn (written to
        ``stream`` token by token as it is generated, when given) and return it."""
        import torch

        self.messages.append({"role": "user", "content": prompt})
        inputs = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        streamer = None
        if stream is not None:
            streamer = _streamer_to(stream)(self.tokenizer, skip_prompt=True,
                                            skip_special_tokens=True)
        with torch.no_grad():
            generated = self.model.generate(
                **inputs, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
                **self.options.generate_kwargs())
        answer = self.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def _streamer_to(stream: TextIO) -> type:
    """transformers' TextStreamer (which prints to stdout) writing to ``stream`` instead."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo


#: Lines the interactive loop reads as commands rather than turns.
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def chat_loop(conversation: Conversation, lines: Iterable[str] | None = None,
              out: TextIO | None = None, prompt: Callable[[], None] | None = None) -> int:
    """Read turns from ``lines`` (stdin) until end of input or ``/exit``, stream each reply to
    ``out``; ``/reset`` forgets the history. Returns the number of turns answered."""
    out = out or sys.stdout
    lines = sys.stdin if lines is None else lines
    turns = 0
    if prompt:
        prompt()
    for line in lines:
        text = line.strip()
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            conversation.reset()
        elif text:
            conversation.reply(text, stream=out)
            turns += 1
        if prompt:
            prompt()
    return turns


__all__ = ["Conversation", "GenerationOptions", "chat_loop", "load_chat_model"]
