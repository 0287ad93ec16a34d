"""A distillation run: the loop in this process (:mod:`~ddray.run.loop`), the lifecycle it shares with the
Ray driver (:mod:`~ddray.run.lifecycle`: run directory, start state, artifact, evaluation, publishing) and
the state a checkpoint holds (:mod:`~ddray.run.state`)."""
