"""Regenerate the embedded default's offline tokenizer (halfv_export/graphs/embedded/*/tokenizer.json).

A byte-level BPE (GPT-2/Qwen style pre-tokenizer) trained on a small fixed English corpus, with the Qwen2.5-VL
special tokens appended after the regular vocabulary, as in the real checkpoints. Run once; the JSON it writes is
the shipped artefact, so the embedded default never depends on training being reproducible.

    python tools/make_embedded_tokenizer.py halfv_export/graphs/embedded/qwen2_5_vl
"""

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

WORDS = """a an the this that these those is are was were be what which who where when how why many much
describe detail image picture photo scene text read write shape shapes circle square triangle rectangle star line
lines stripe stripes dot dots grid texture pattern noise color colour colours red green blue yellow orange purple
black white gray grey pink brown left right top bottom middle center corner above below next to of in on at with
and or not there here count number numbers letter letters word words say says written large small big tiny
background foreground object objects visible see you can please answer question short one two three four five six
seven eight nine ten yes no system user assistant helpful You are a helpful assistant"""


def corpus():
    words = WORDS.split()
    for i, w in enumerate(words):
        yield " ".join(words[i:i + 12])
        yield w.capitalize() + "?"
    for n in range(200):
        yield f"There are {n} objects. Item {n}: {words[n % len(words)]} {words[(7 * n) % len(words)]}."


def main(out_dir: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(QWEN_SPECIALS)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    print({t: tok.token_to_id(t) for t in QWEN_SPECIALS}, "vocab", tok.get_vocab_size())


if __name__ == "__main__":
    main(sys.argv[1])
