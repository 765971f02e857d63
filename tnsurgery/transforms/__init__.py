"""Built-in transform plugins, one module per transform, each registered through the
``tnsurgery`` entry-point group exactly like a third party's."""
