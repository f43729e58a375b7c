"""The training that makes the shipped embedded defaults: `python -m halfv_export.training --help`."""
