"""Judging distilled sets: held-out networks trained on them and tested on real data
(:mod:`~ddray.evaluation.held_out`), DD-Ranking's scores (:mod:`~ddray.evaluation.scores`), sets side by
side (:mod:`~ddray.evaluation.compare`) and their pictures (:mod:`~ddray.evaluation.viz`)."""
