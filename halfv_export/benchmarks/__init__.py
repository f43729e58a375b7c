"""bench: prefill / decode / vision timings of exported graphs against eager, at published model shapes."""
