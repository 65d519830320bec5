"""Runnable beam_dl pipelines: `python -m pipelines.<name> --help`."""
