"""Safe, offline loading of local checkpoints and of the embedded defaults.

Rules: safetensors only (pickle-based weights are refused, with no opt-in), trust_remote_code is never set,
nothing is fetched from a hub. Every problem is reported as one BadInput line naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..base.errors import BadInput

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED_ROOT = Path(__file__).parent / "embedded"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
SHARD_INDEX = "model.safetensors.index.json"  # the index transformers writes beside sharded weights

# Config keys that do not change the computation: left out of the model fingerprint so that re-saving a
# checkpoint with another transformers version keeps its schedule valid.
_NON_ARCH_KEYS = {
    "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "id2label", "label2id",
    "output_hidden_states", "output_attentions", "return_dict", "use_cache", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "_attn_implementation", "_commit_hash",
    "_attn_implementation_autoset", "tokenizer_class", "pad_token_id", "bos_token_id", "eos_token_id",
}


def read_config_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} does not exist; pass a checkpoint directory that contains config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e.__class__.__name__}); restore the file from the checkpoint") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a JSON object; restore config.json from the checkpoint")
    return data


def check_checkpoint_dir(model_dir: Path, model_types: tuple[str, ...]) -> dict:
    """Validate a checkpoint directory before any heavy loading; returns its config.json."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BadInput(f"--model {model_dir}: not a directory; pass a local checkpoint directory")
    config = read_config_json(model_dir / "config.json")
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise BadInput(
            f"--model {model_dir}: model_type '{model_type}' is not supported by this backbone "
            f"(expects {', '.join(model_types)}); pick the matching --backbone"
        )
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise BadInput(
                f"--model {model_dir}: only pickle-based weights ({pickled[0]}) found; they are refused because "
                "unpickling can run code. Convert them to safetensors first"
            )
        raise BadInput(f"--model {model_dir}: no *.safetensors weights found; copy the weight files into the directory")
    index = model_dir / SHARD_INDEX
    if index.exists():
        check_shard_index(index)
    else:
        for path in weights:
            check_safetensors(path)
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise BadInput(f"--model {model_dir}: no tokenizer files (tokenizer.json); copy them from the checkpoint")
    if not (model_dir / "preprocessor_config.json").exists():
        raise BadInput(f"--model {model_dir}: preprocessor_config.json is missing; copy it from the checkpoint")
    return config


def check_shard_index(index: Path) -> None:
    """A sharded checkpoint (model.safetensors.index.json + shards): the index is a JSON object whose weight_map
    names, for every tensor, a shard file in the same directory; every shard exists, passes check_safetensors, and
    holds every tensor the index assigns to it."""
    data = read_config_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise BadInput(f"{index}: no weight_map of tensor name -> shard file; restore the index from the checkpoint")
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise BadInput(f"{index}: shard {shard!r} is not a .safetensors file name in the checkpoint directory; "
                           "restore the index from the checkpoint")
        shards.setdefault(shard, set()).add(tensor)
    for shard, tensors in sorted(shards.items()):
        path = index.parent / shard
        if not path.is_file():
            raise BadInput(f"{index.parent}: shard {shard} (listed in {index.name}) is missing; copy all shards")
        header = check_safetensors(path)
        absent = sorted(tensors - header.keys())
        if absent:
            raise BadInput(f"{path}: {len(absent)} tensor(s) the index assigns to it are not in it (first: "
                           f"{absent[0]}); the shard and {index.name} do not belong together, copy both again")


def check_safetensors(path: Path) -> dict:
    """Header sanity without reading the weights: a truncated or foreign file fails here with its name. Returns the
    header (tensor name -> dtype, shape, offsets)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError("header")
            header = json.loads(f.read(header_len))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, IndexError):
        raise BadInput(f"{path}: not a readable safetensors file (truncated or corrupt); copy it again") from None
    if ends and 8 + header_len + max(ends) > size:
        raise BadInput(f"{path}: truncated ({size} bytes, the header promises {8 + header_len + max(ends)}); "
                       "copy it again")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def load_pretrained(model_class, model_dir: Path, dtype=None):
    """from_pretrained, offline, safetensors only, no remote code, on CPU at `dtype` (default fp32): an export at
    bf16 loads a bf16 checkpoint as it is stored instead of holding an fp32 copy. transformers' own "Loading
    weights" bar is off while it runs: the stages report progress to their caller, and the library prints nothing."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = model_class.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, trust_remote_code=False,
            dtype=dtype or torch.float32, attn_implementation="sdpa",
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise BadInput(f"--model {model_dir}: the weights could not be loaded ({first[:200]})") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval()


def seeded_model(model_class, config, seed: int):
    """The embedded default: the architecture from the shipped config, weights drawn from `seed`.

    Same seed and torch version -> bit-identical weights (tested)."""
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.float().eval()


def config_fingerprint(config) -> str:
    """sha256 of the architecture-defining part of a config (transformers PretrainedConfig or dict)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in sorted(obj.items()) if k not in _NON_ARCH_KEYS}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    canonical = json.dumps(strip(data), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def load_chat_template(tokenizer, model_dir: Path) -> None:
    """Real Qwen checkpoints keep the template in chat_template.json / .jinja beside the tokenizer."""
    if getattr(tokenizer, "chat_template", None):
        return
    jinja = model_dir / "chat_template.jinja"
    js = model_dir / "chat_template.json"
    if jinja.exists():
        tokenizer.chat_template = jinja.read_text()
    elif js.exists():
        tokenizer.chat_template = read_config_json(js).get("chat_template")
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"--model {model_dir}: no chat template found; copy chat_template.json from the checkpoint")
