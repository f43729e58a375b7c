"""Regenerate an embedded default's offline tokenizer (halfv_export/graphs/embedded/*/tokenizer.json).

A byte-level BPE trained on a small fixed English corpus, with the backbone's special tokens appended after the
regular vocabulary, as in the real checkpoints (Qwen's <|...|> tokens; LLaVA's <s>, </s>, <image>, <pad>, with
<s> prepended by the post-processor like a Llama tokenizer). Run once; the JSON it writes is the shipped artefact,
so the embedded default never depends on training being reproducible.

    python tools/make_embedded_tokenizer.py halfv_export/graphs/embedded/qwen2_5_vl qwen
    python tools/make_embedded_tokenizer.py halfv_export/graphs/embedded/llava_1_5 llava
"""

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

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


def main(out_dir: str, family: str = "qwen") -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    specials = QWEN_SPECIALS if family == "qwen" else LLAVA_SPECIALS
    tok.add_special_tokens(specials)
    if family == "llava":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    print({t: tok.token_to_id(t) for t in specials}, "vocab", tok.get_vocab_size())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "qwen")
