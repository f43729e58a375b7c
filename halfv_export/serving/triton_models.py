"""The models Triton's Python backend runs in a repository written by serving/triton.py. Imported by the stub's
interpreter (the runtime install, numpy < 2), never by the CLI; `triton_python_backend_utils` exists only there.

Orchestrator   image bytes + prompt (+ max_tokens, full) -> text. Its engine is engines/api.Model over a runner
               whose every graph is a BLS call to that graph's Triton model, so the host side (chat template,
               tokenizer, image preprocessing, M-RoPE positions), the bucket grouping and the greedy loop are the
               ones `halfv-export run` uses. Non-decoupled: one response per request; decoupled: one per decoded
               piece, the last with the final flag.
GraphModel     one graph with ONNX Runtime inside the stub (`--graph-backend python`): an OrtRunner over the
               repository's copy of the build, so the engine stage's fused prefill graphs are what runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..base.errors import BadInput, HalfvError, RuntimeFailure
from ..base.manifest import verify_manifest
from ..engines.api import Detokenizer, Model
from ..engines.pipeline import EnginePipeline

from .triton import GRAPHS_FILE

DEFAULT_MAX_TOKENS = 32


def _parameters(config: dict) -> dict:
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _build_folder(args: dict, config: dict) -> Path:
    return (Path(args["model_repository"]) / _parameters(config)["build"]).resolve()


class TritonRunner:
    """engines/base.Runner: each graph is a BLS request to its Triton model; outputs come back as host numpy."""

    runs_bf16 = False

    def __init__(self, pb, graphs: dict):
        self.pb, self.graphs = pb, graphs

    def run(self, graph: str, feeds: dict) -> dict:
        spec = self.graphs[graph]
        inputs = [self.pb.Tensor(name, np.ascontiguousarray(feeds[name])) for name in spec["inputs"]]
        # outputs in host memory: a graph model on a GPU instance would otherwise answer with device tensors
        cpu, kind = getattr(self.pb, "PreferredMemory", None), getattr(self.pb, "TRITONSERVER_MEMORY_CPU", None)
        where = {} if cpu is None or kind is None else {"preferred_memory": cpu(kind, 0)}
        response = self.pb.InferenceRequest(model_name=spec["model"], requested_output_names=spec["outputs"],
                                            inputs=inputs, **where).exec()
        if response.has_error():
            raise RuntimeFailure(f"{spec['model']}: {response.error().message()}")
        # copies: the response's buffers belong to Triton's shared memory, the cache outlives the response
        return {t.name(): np.array(t.as_numpy()) for t in response.output_tensors()}

    def describe(self) -> str:
        return "Triton Inference Server, graph models over BLS"


class Orchestrator:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb

        self.pb = pb
        config = json.loads(args["model_config"])
        self.decoupled = pb.using_decoupled_model_transaction_policy(config)
        build = _build_folder(args, config)
        verify_manifest(build, full=False)
        graphs = json.loads((build.parent / GRAPHS_FILE).read_text())
        self.model = Model(EnginePipeline(build, TritonRunner(pb, graphs)))

    # ------------------------------------------------------------------------------------------------ requests
    def _rows(self, request) -> list[dict]:
        """One request's rows (a client may batch several prompts in one request) -> prompt, image, budget, full."""
        pb = self.pb

        def column(name):
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy().reshape(-1)

        prompts, images = column("prompt"), column("image")
        if prompts is None:
            raise BadInput("the request has no `prompt` input; send the prompt as a BYTES tensor of shape [1, 1]")
        budgets, fulls = column("max_tokens"), column("full")
        context = self.model.context or 1 << 30
        rows = []
        for i, prompt in enumerate(prompts):
            budget = DEFAULT_MAX_TOKENS if budgets is None else int(budgets[i])
            if not 1 <= budget <= context:
                raise BadInput(f"max_tokens must be between 1 and {context}, not {budget}")
            try:
                text = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
            except UnicodeDecodeError:
                raise BadInput("the prompt is not UTF-8 text; send it UTF-8 encoded") from None
            image = self.model.image(bytes(images[i])) if images is not None and len(images[i]) else None
            rows.append({"prompt": text, "image": image, "budget": budget,
                         "full": False if fulls is None else bool(fulls[i])})
        return rows

    def _tensors(self, texts: list[str], finishes: list[str]):
        pb = self.pb
        return [pb.Tensor("text", np.array([[t.encode()] for t in texts], dtype=object)),
                pb.Tensor("finish_reason", np.array([[f.encode()] for f in finishes], dtype=object))]

    def _error(self, message: str, bad_input: bool = True):
        """One line as the request's error: Triton's INVALID_ARG (HTTP 400) for bad input, where this Python backend
        has error codes; INTERNAL (500) for a failure of the server's own."""
        code = getattr(self.pb.TritonError, "INVALID_ARG" if bad_input else "INTERNAL", None)
        error = self.pb.TritonError(message) if code is None else self.pb.TritonError(message, code)
        return self.pb.InferenceResponse(error=error)

    def execute(self, requests):
        """Triton's dynamic batcher hands several requests at once: their rows run together, grouped by image
        bucket and by `full` (engines/api.Model does the bucket split). A request whose input is bad gets its own
        one-line error; a group that fails while it runs fails its own requests only; the others carry on.
        Decoupled: each stream gets its pieces as they are decoded and its final flag with its last piece."""
        self.senders = [request.get_response_sender() for request in requests] if self.decoupled else None
        self.closed: set = set()  # streams already given their final flag
        parsed, responses = {}, [None] * len(requests)
        for r, request in enumerate(requests):
            try:
                rows = self._rows(request)
                if self.decoupled and len(rows) != 1:
                    raise BadInput("a streaming request carries one prompt; send a batch as separate requests")
                parsed[r] = rows
            except HalfvError as e:
                responses[r] = self._fail(r, str(e))
        groups: dict = {}
        for r, rows in parsed.items():
            for i, row in enumerate(rows):
                groups.setdefault((self.model.bucket_of(row["image"]), row["full"]), []).append((r, i, row))
        results = {r: [None] * len(rows) for r, rows in parsed.items()}
        for (_, full), items in groups.items():
            for batch, decoding in self._start(items, full, responses):
                try:
                    self._decode(batch, decoding, results)
                except Exception as e:  # noqa: BLE001 - a graph model's failure fails this group's requests only
                    self._fail_group(batch, e, responses)
        if self.decoupled:
            for r, sender in enumerate(self.senders):
                if r not in self.closed:
                    sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None
        for r in parsed:
            if responses[r] is None:
                texts, finishes = zip(*results[r])
                responses[r] = self.pb.InferenceResponse(output_tensors=self._tensors(list(texts), list(finishes)))
        return responses

    def _fail(self, r: int, message: str, bad_input: bool = True):
        """Request r's error response; a stream gets it at once, with its final flag."""
        response = self._error(message, bad_input)
        if self.decoupled and r not in self.closed:
            self.senders[r].send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.closed.add(r)
        return response

    def _start(self, items: list, full: bool, responses: list) -> list:
        """[(rows, Decoding)]: the group prefilled as one batch, or, where it is refused (a prompt over the
        context), each row alone, so that only the bad request fails."""
        try:
            return [(items, self.model.start([row["image"] for _, _, row in items],
                                             [row["prompt"] for _, _, row in items],
                                             [row["budget"] for _, _, row in items], full))]
        except BadInput as e:
            if len(items) == 1:
                r = items[0][0]
                responses[r] = self._fail(r, str(e).replace("prompt 0 has", "the prompt has", 1))
                return []
        except Exception as e:  # noqa: BLE001 - a graph model failed in the prefill: this group only
            self._fail_group(items, e, responses)
            return []
        return [started for item in items for started in self._start([item], full, responses)]

    def _fail_group(self, items: list, error: Exception, responses: list) -> None:
        message = " ".join(f"{type(error).__name__}: {error}".split())[:500]
        for r in {r for r, _, _ in items}:
            responses[r] = self._fail(r, message, bad_input=False)

    def _decode(self, items: list, decoding, results: dict) -> None:
        texts = [Detokenizer(self.model.tokenizer) for _ in items] if self.decoupled else None
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while not decoding.done:
            for row, token, finish in decoding.step():
                if not self.decoupled:
                    continue
                r = items[row][0]
                piece = texts[row].push(token) + (texts[row].flush() if finish else "")
                if piece or finish:
                    response = self.pb.InferenceResponse(output_tensors=self._tensors([piece], [finish or ""]))
                    self.senders[r].send(response, flags=final if finish else 0)
                    if finish:
                        self.closed.add(r)
            if self.decoupled:  # a client that went away: its row leaves the batch (Triton still wants the flag)
                gone = [row for row in decoding.rows
                        if getattr(self.senders[items[row][0]], "is_cancelled", lambda: False)()]
                if gone:
                    decoding.cancel(gone)
                    for row in gone:
                        self.senders[items[row][0]].send(flags=final)
                        self.closed.add(items[row][0])
        for row, (r, i, _) in enumerate(items):
            results[r][i] = (self.model.pipeline.decode_text(decoding.generated[row]), decoding.finish[row])


class GraphModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb

        from ..engines.ort import OrtRunner

        self.pb = pb
        config = json.loads(args["model_config"])
        self.graph = _parameters(config)["graph"]
        self.outputs = [o["name"] for o in config["output"]]
        self.runner = OrtRunner(_build_folder(args, config))
        self.runner.session(self.graph)  # open now: a broken graph fails the load, not the first request

    def execute(self, requests):
        pb, responses = self.pb, []
        for request in requests:
            feeds = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                out = self.runner.run(self.graph, feeds)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime's message goes back as the request's error
                responses.append(pb.InferenceResponse(error=pb.TritonError(" ".join(str(e).split())[:500])))
                continue
            names = request.requested_output_names() or self.outputs
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, out[n]) for n in names]))
        return responses
