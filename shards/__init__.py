"""The unified atom-graph schema, WebDataset shards with index and manifest, and the streaming sampler."""
from shards.format.schema import SCHEMA_VERSION_STR, AtomGraph, SchemaError, make_key

__all__ = ["AtomGraph", "SchemaError", "make_key", "SCHEMA_VERSION_STR"]
