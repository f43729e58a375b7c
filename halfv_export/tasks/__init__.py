"""The digit tasks the embedded defaults are trained and judged on: digit grids and pages (real scans)."""
