"""Experiments built on training and evaluation: leave-one-centre-out ablations (:mod:`gsema_fast.experiments.lodo`)."""
