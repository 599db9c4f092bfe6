"""Diagnostics: plots of results and training curves."""
