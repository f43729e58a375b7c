"""The command line: Click commands that parse options, call the library (stages) and render its results."""
