"""Composition of adapters: compatibility checks first, then blending, stacking and merging."""
