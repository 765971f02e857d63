"""The ``tnsurgery`` command line: thin click commands over the library API.

- :mod:`~tnsurgery.cli.app`: the group, exit codes (0 ok, 2 bad input, 1 bug), main;
- :mod:`~tnsurgery.cli.run`: ``plan``, ``apply``, ``train``, ``export``;
- :mod:`~tnsurgery.cli.speed`: ``bench`` (each replacement timed at token counts);
- :mod:`~tnsurgery.cli.evaluate`: ``eval`` (perplexity, cosine, accuracy);
- :mod:`~tnsurgery.cli.info`: ``validate``, ``schema``, ``plugins``, ``inspect``, ``demo``;
- :mod:`~tnsurgery.cli.inputs`: model options, sample inputs, output names, sources;
- :mod:`~tnsurgery.cli.render`: tables and progress.
"""

from tnsurgery.cli import evaluate, info, run, speed
from tnsurgery.cli.app import cli, main
from tnsurgery.cli.inputs import resolve_sample_input

__all__ = ["cli", "evaluate", "info", "main", "resolve_sample_input", "run", "speed"]
