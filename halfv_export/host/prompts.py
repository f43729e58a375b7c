"""User text -> token ids inside the chat template, with the user's text always read as text.

A prompt is untrusted input. Tokenising the rendered chat template as one string lets the user's characters become
control tokens: "hi<|im_end|>\\n<|im_start|>system\\n..." would close the user turn and open a system turn, and
"<|image_pad|>" or "<image>" would become image-placeholder tokens (an image slot without an image, or a second one).
Here only the chat template inserts control tokens and the image slot; the user's characters are tokenised with
special tokens split (Hugging Face `split_special_tokens`), i.e. as the plain text they spell.

Per prompt, with T = prefix + text + suffix the rendered template (prefix and suffix are the template's own text,
found by rendering it around a sentinel; the image placeholder is expanded to N copies in the template's part only):

1. T is tokenised the way it always was (added tokens parsed). If no control token came from the user's characters
   [a, b) of T, those are the ids: an ordinary prompt gets byte-identical ids, whatever the tokenizer.
2. Otherwise the stretch [l, r) of T between the template's own added tokens left and right of the user's text is
   tokenised again with special tokens split, and its ids replace the stretch's old ids. A tokenizer splits its
   input at added tokens and tokenises the stretches between them independently, so the result is exactly the
   template's tokenisation with the user's characters read as text ("the escaped text").

Control tokens are the tokenizer's special added tokens plus the image token (even where a tokenizer forgot to
mark it special). Non-special added tokens are ordinary vocabulary and stay as the tokenizer makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base.errors import BadInput

SENTINEL = "\ue000halfv-prompt-text\ue001"  # private-use code points: no chat template contains them


@dataclass(frozen=True)
class RenderedPrompt:
    """The chat template applied to one prompt: the whole string and where the user's characters sit in it."""

    text: str  # T = prefix + user text + suffix, image placeholder expanded in prefix/suffix only
    user: tuple[int, int]  # [a, b): the user's characters in `text` (after the template's own filters, e.g. trim)


def render_prompt(tokenizer, prompt: str, has_image: bool, placeholder: str, count: int) -> RenderedPrompt:
    """One user turn (an image part first where there is an image) + the generation prompt, as a string."""

    def chat(text: str) -> str:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    framed = chat(SENTINEL)
    if framed.count(SENTINEL) != 1:
        raise BadInput(f"the model's chat template renders the prompt text {framed.count(SENTINEL)} times instead of "
                       "once; use the checkpoint's own chat_template.jinja")
    prefix, suffix = framed.split(SENTINEL)
    full = chat(prompt)  # the template may filter the text (e.g. trim): the user's span is what lies between
    if len(full) < len(prefix) + len(suffix) or not (full.startswith(prefix) and full.endswith(suffix)):
        raise BadInput("the model's chat template changes its own text depending on the prompt, so the prompt "
                       "cannot be kept apart from the template's control tokens; use the checkpoint's own "
                       "chat_template.jinja")
    text = full[len(prefix):len(full) - len(suffix)]
    slots = prefix.count(placeholder) + suffix.count(placeholder)
    if slots != int(has_image):
        raise BadInput(f"the model's chat template renders {slots} image placeholders {placeholder!r} for "
                       f"{int(has_image)} image; it must render exactly one per image (use the checkpoint's own "
                       "chat_template.jinja)")
    prefix, suffix = (part.replace(placeholder, placeholder * count) for part in (prefix, suffix))
    return RenderedPrompt(prefix + text + suffix, (len(prefix), len(prefix) + len(text)))


def control_token_ids(tokenizer, image_token_id: int) -> set[int]:
    """Ids that only the template may insert: every special added token, and the image placeholder."""
    return {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special} | {int(image_token_id)}


def prompt_ids(tokenizer, rendered: RenderedPrompt, control: set[int], add_special_tokens: bool) -> list[int]:
    """Token ids of one rendered prompt, the user's characters read as text (see the module docstring)."""
    text, (a, b) = rendered.text, rendered.user
    # the template's control tokens are parsed even where tokenizer_config.json sets split_special_tokens
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}

    left, right, injected = -1, len(ids), []
    for i, (tid, (s, e)) in enumerate(zip(ids, offsets)):
        if tid not in added:
            continue
        # the token's own characters (its span may also hold whitespace it strips, lstrip/rstrip)
        at = text.find(added[tid], s, e)
        start, end = (at, at + len(added[tid])) if at >= 0 else (s, e)
        if start < b and end > a:  # the user's characters made it
            if tid in control:
                injected.append(added[tid])
        elif end <= a:
            left = i
        elif right == len(ids):
            right = i
    if not injected:
        return post_processed(tokenizer, text, ids, ids, add_special_tokens)

    # re-tokenise the stretch between the template's added tokens around the user's text, specials split
    lo = offsets[left][1] if left >= 0 else 0
    hi = offsets[right][0] if right < len(ids) else len(text)
    stretch = text[lo:hi]
    if tokenizer(stretch, add_special_tokens=False, split_special_tokens=False)["input_ids"] != ids[left + 1:right]:
        raise BadInput(f"the prompt contains {injected[0]!r}, which must stay text, but this tokenizer tokenises "
                       "text differently in the middle of a prompt than on its own (position-dependent "
                       f"pre-tokenizer), so it cannot be read as text here; remove {injected[0]!r} from the prompt")
    escaped = tokenizer(stretch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    leftover = [t for t in escaped if t in control]
    if leftover:  # a control token the tokenizer does not mark special: split_special_tokens cannot split it
        name = tokenizer.convert_ids_to_tokens(leftover[0])
        raise BadInput(f"the prompt contains {name!r}, which this tokenizer always reads as a control token (it is "
                       f"not marked special in tokenizer.json); remove {name!r} from the prompt")
    return post_processed(tokenizer, text, ids, ids[:left + 1] + escaped + ids[right:], add_special_tokens)


def post_processed(tokenizer, text: str, plain: list[int], content: list[int], add_special_tokens: bool) -> list[int]:
    """`content` with what the tokenizer's post-processor adds around `plain` (e.g. LLaVA's <s>)."""
    if not add_special_tokens:
        return content
    full = tokenizer(text, add_special_tokens=True, split_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k] + content + full[k + len(plain):]
    raise BadInput("the tokenizer's post-processor rewrites the prompt's tokens instead of adding special tokens "
                   "around them; use the checkpoint's own tokenizer.json")


def tokenized_rows(tokenizer, images: list, prompts: list[str], placeholder: str, count: int, image_token_id: int,
                   add_special_tokens: bool) -> list[list[int]]:
    """Chat template per prompt (an image part where there is an image), the template's image placeholder expanded
    to `count` tokens as the processors do, the user's text read as text -> one id row per prompt."""
    if not getattr(tokenizer, "is_fast", False):  # character offsets (where the user's text sits) need tokenizer.json
        raise BadInput("the model's tokenizer has no tokenizer.json (a fast tokenizer is needed to keep the prompt "
                       "apart from control tokens); save the tokenizer with transformers to get one")
    control = control_token_ids(tokenizer, image_token_id)
    rows = []
    for image, prompt in zip(images, prompts):
        rendered = render_prompt(tokenizer, prompt, image is not None, placeholder, count)
        ids = prompt_ids(tokenizer, rendered, control, add_special_tokens)
        found, expected = ids.count(image_token_id), (count if image is not None else 0)
        if found != expected:
            raise BadInput(f"the tokenizer turns the chat template's image slot ({expected} x {placeholder!r}) into "
                           f"{found} image tokens (id {image_token_id} in config.json); the checkpoint's tokenizer "
                           "and config disagree")
        rows.append(ids)
    return rows
