"""The Click CLI, the pipeline driving calibrate -> export -> engine -> validate, and schedule I/O."""
