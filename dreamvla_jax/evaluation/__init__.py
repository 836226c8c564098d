"""Evaluation: chained rollouts over a pool of environments (``rollout``), offline dataset metrics
(``offline``), videos and dream panels (``media``) and reference policies (``baselines``)."""
