"""Host-side inputs built with numpy, Pillow, tokenizers and jinja2 alone (no torch, no transformers), exactly as
the transformers processors build them: what a deployment host computes before the graphs run."""
