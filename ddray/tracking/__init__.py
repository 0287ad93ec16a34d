"""Tracking runs: the tracker interface and its MLflow implementation (:mod:`~ddray.tracking.tracker`,
the only module that imports MLflow) and the background writer that batches metrics
(:mod:`~ddray.tracking.batch_writer`)."""
