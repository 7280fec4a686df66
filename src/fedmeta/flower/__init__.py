"""fedmeta on Flower: a strategy and ServerApp running fedmeta's server side, a ClientApp
running its client update and personalization, and the Flower App that deploys an experiment.

Needs the ``flower`` extra (``pip install "fedmeta[flower]"``); ``import fedmeta`` never
imports Flower. ``fedmeta.flower.app`` alone (run config and App directory) does not
either, so the CLI can write an App on a machine without Flower.
"""
