"""The application floor: what is built *with* the library, not part of it.

- :mod:`~qarm_features.app.protocol`: the MovieLens-100k evaluation protocol (config,
  variants, temporal and item-cold splits, point-in-time histories).
- :mod:`~qarm_features.app.item_spaces`: the protocol's item spaces over
  :func:`qarm_features.build.pipeline.fit_item_space`.
- :mod:`~qarm_features.app.variants`: one ranker per variant, trained and scored.
- :mod:`~qarm_features.app.evaluate`: ``qarm evaluate`` (:func:`run_evaluation`).
- :mod:`~qarm_features.app.report`: the report files and the development notes.
- :mod:`~qarm_features.app.ranker`: the example DIN ranker over QARM features.

Modules here may import anything in ``qarm_features``; nothing outside ``app`` (and the
CLI) imports them. Importing this package imports none of them.
"""
