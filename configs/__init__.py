"""Shipped run configurations (YAML), installed as ``gsema_fast.configs``."""
