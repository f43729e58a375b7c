"""Prompts -> token ids without transformers: the chat template rendered by jinja2 in the sandbox transformers
renders it in, and tokenizer.json run by `tokenizers`, behind the small surface of a transformers fast tokenizer
that host/prompts.py reads (apply_chat_template, __call__ with offsets and split_special_tokens,
added_tokens_decoder, decode). tests/test_host_text.py holds every piece equal to transformers on the shipped
tokenizers, read from the folder an export writes (save_pretrained).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (training templates mark assistant text with it): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore-prefixed attributes (a way into interpreter internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """The template in an immutable sandbox with the filters and globals transformers gives chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=dict, namespace=_Namespace)
    return env.from_string(source)


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool


class HostTokenizer:
    """A model folder's tokenizer.json, tokenizer_config.json and chat template, with what the prompt code needs of
    a transformers fast tokenizer. The folder is meant to be an export's: transformers 5 rebuilds some tokenizers'
    pipelines on load (Qwen2's normaliser and split regex), and the tokenizer.json an export saves is the one it
    runs, while a checkpoint's own file may not be."""

    is_fast = True

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        source = _template_source(folder, self.config)
        self.template = compile_template(source) if source else None
        self.added_tokens_decoder = {i: AddedToken(t.content, t.special)
                                     for i, t in self.backend.get_added_tokens_decoder().items()}
        self.special_tokens = {key: _content(self.config[key]) for key in SPECIAL_KEYS if self.config.get(key)}

    def _id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("HostTokenizer renders the template to text only; tokenise the text with __call__")
        if self.template is None:
            raise ValueError("the model folder has no chat template")
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 split_special_tokens: bool = False) -> dict:
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = split_special_tokens
        try:
            encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        finally:
            self.backend.encode_special_tokens = previous
        out = {"input_ids": list(encoding.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = list(encoding.offsets)
        return out

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def _template_source(folder: Path, config: dict) -> str | None:
    """The chat template where transformers looks for it: chat_template.jinja, chat_template.json, then
    tokenizer_config.json's `chat_template`."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return config.get("chat_template")


def _content(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)
