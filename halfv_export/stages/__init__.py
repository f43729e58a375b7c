"""The stages as library functions: calibrate, export, engine, validate, build, make-task, compare; typed results,
progress through a callback, nothing printed."""
