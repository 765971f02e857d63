"""The contract every replacement layer follows (:class:`SurgeryLayer`, defined in
:mod:`tnsurgery.layer`; importable from here, as plugin authors do)."""

from tnsurgery.layer import SurgeryLayer

__all__ = ["SurgeryLayer"]
