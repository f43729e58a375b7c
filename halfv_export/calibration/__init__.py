"""Choosing the schedule: TME / KL probes and the rules that read them, the FLOPs-budget search, schedule.json."""
