"""Helpers that data preparation and the pipeline share: atomic files, the output policy, launchers, command lines."""
