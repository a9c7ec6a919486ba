"""The application floor: what is built *with* the library, not part of it.

- :mod:`~qarm_features.app.protocol`: the evaluation protocol (config, variants, temporal
  split, cold and new items, sampled negatives, point-in-time histories).
- :mod:`~qarm_features.app.item_spaces`: the protocol's item spaces over
  :func:`qarm_features.build.pipeline.fit_item_space`.
- :mod:`~qarm_features.app.variants`: one ranker per variant, trained and scored.
- :mod:`~qarm_features.app.evaluate`: ``qarm evaluate --repo R`` (:func:`evaluate_repo`).
- :mod:`~qarm_features.app.paired`: paired differences, their 95% intervals, the aims.
- :mod:`~qarm_features.app.report`: the report files.
- :mod:`~qarm_features.app.ranker`: the example DIN ranker over QARM features.

Modules here may import anything in ``qarm_features``; nothing outside ``app`` (and the
CLI) imports them. Importing this package imports none of them.
"""
