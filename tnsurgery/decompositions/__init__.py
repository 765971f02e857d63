"""Numerical building blocks shared by the transforms (SVDs, tensor decompositions,
mode factorizations). Transforms never import each other; they share these."""
