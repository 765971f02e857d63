"""The contract every replacement layer follows (:class:`SurgeryLayer`, defined in
:mod:`tnsurgery.layer`; importable from here, as plugin authors do), and
:class:`DenseWeight`, what such a layer's ``weight`` is."""

from tnsurgery.layer import DenseWeight, SurgeryLayer

__all__ = ["DenseWeight", "SurgeryLayer"]
