"""`moe-hub chat CKPT`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def chat_command(
    checkpoint: Annotated[str, typer.Argument(help="A moe-hub checkpoint directory")],
    prompt: Annotated[str | None, typer.Option(
        "-p", "--prompt", help="Answer this one prompt and exit (no interactive session)")] = None,
    system: Annotated[str | None, typer.Option(
        help="System message put before the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens")] = 256,
    temperature: Annotated[float, typer.Option(
        help="0 (default): greedy decoding; > 0: sample at this temperature")] = 0.0,
    top_p: Annotated[float, typer.Option(
        help="Nucleus sampling threshold (with --temperature > 0)")] = 1.0,
    bf16: Annotated[bool, typer.Option("--bf16", help="Load the weights in bfloat16")] = False,
) -> None:
    """Chat with a checkpoint through its chat template, streaming the reply as it is generated.

    Interactive: one turn per line of input, the history kept; /reset forgets it, /exit or end of
    input (Ctrl-D) stops.
    """
    from moe_hub.chat import Conversation, GenerationOptions, chat_loop, load_chat_model

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p)
    options.validate()
    import torch

    model, tokenizer = load_chat_model(checkpoint, dtype=torch.bfloat16 if bf16 else None)
    conversation = Conversation(model, tokenizer, system=system, options=options)
    if prompt is not None:
        conversation.reply(prompt, stream=sys.stdout)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the checkpoint: /reset forgets the history, /exit or Ctrl-D stops.",
              file=sys.stderr)
    chat_loop(conversation, sys.stdin, sys.stdout,
              prompt=(lambda: print("> ", end="", flush=True)) if interactive else None)
