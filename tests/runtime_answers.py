"""Answers of a build through the runtime alone: `python tests/runtime_answers.py BUILD CASES.json [--block]`
prints one JSON object: per case (an image path or null, a prompt, max_new_tokens) the greedy token ids and text of
`halfv_export.load(BUILD).generate`, all cases in one batched call, and the loaded top-level modules.
`python tests/runtime_answers.py cli ARGS...` runs `halfv-export ARGS...` with the same block.

--block makes torch, transformers and the rest of the [export] extra unimportable first, which is what the runtime
install is (tests/test_runtime_install.py runs it both ways: here, and in a fresh venv holding the runtime alone)."""

import importlib.abc
import json
import sys

EXPORT_EXTRA = {"torch", "transformers", "safetensors", "onnx", "onnxscript", "matplotlib", "sklearn", "scipy"}


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXPORT_EXTRA:
            raise ModuleNotFoundError(f"No module named '{name}' (blocked: the runtime install)", name=name)
        return None


def main(build: str, cases_file: str, block: bool) -> None:
    if block:
        sys.meta_path.insert(0, Blocked())
    import halfv_export

    cases = json.loads(open(cases_file).read())
    model = halfv_export.load(build)
    budget = max(c["max_new_tokens"] for c in cases)
    answers = model.generate([c["image"] for c in cases], [c["prompt"] for c in cases], max_new_tokens=budget)
    loaded = sorted({name.split(".")[0] for name in sys.modules} & EXPORT_EXTRA)
    print(json.dumps({"answers": [{"token_ids": a.token_ids, "text": a.text, "bucket": a.bucket} for a in answers],
                      "export_extra_loaded": loaded}))


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        sys.meta_path.insert(0, Blocked())
        from halfv_export.cli.main import main as cli

        cli(sys.argv[2:])
    else:
        main(sys.argv[1], sys.argv[2], "--block" in sys.argv[3:])
