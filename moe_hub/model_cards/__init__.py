"""Jinja templates for the README.md model cards that moe-hub checkpoints carry."""
