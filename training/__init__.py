"""The training side: run configuration, model families' optimizers, step strategies, train
state, rollout, evaluation and the loop. Imports ``models``, ``dataset``, ``evaluators`` and
``utils``; nothing below imports it."""
