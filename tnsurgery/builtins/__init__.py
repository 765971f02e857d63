"""Built-in plugins other than transforms: the data sources and the training loop.

Leaves, like :mod:`tnsurgery.transforms`: nothing in the core imports them; they are
registered through the ``tnsurgery`` entry-point group exactly as a third party's
plugins are, and reached through the plugin registry.
"""
