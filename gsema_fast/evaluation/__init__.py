"""Evaluation: case metrics and their summaries (:mod:`~gsema_fast.evaluation.metrics`), the one scoring path of a
network on whole volumes that training's validation uses too (:mod:`~gsema_fast.evaluation.scoring`), a checkpoint
scored on a dataset (:mod:`~gsema_fast.evaluation.evaluate`) and pictures (:mod:`~gsema_fast.evaluation.figures`).

The modules sit on different layers (training validates with the scoring path; ``evaluate`` builds on the run
folder), so this package imports none of them: import each from its module."""
