"""``alignlab studio``: a person ranks a model's answers in a browser, trains on them, and checks the result.

Modules: :mod:`~alignlab.studio.app` (the web application and its security), :mod:`~alignlab.studio.sampler`
(the background thread that keeps the next items sampled), :mod:`~alignlab.studio.jobs` (training runs in a
background process), :mod:`~alignlab.studio.stats` (agreement between labellers, the A/B win rate). The store is
:mod:`alignlab.data.studio_db`, which the trainers read directly.
"""
