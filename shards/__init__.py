"""The shard layer: one schema and storage format (:mod:`shards.format`), the deterministic mixed-domain
stream that feeds a trainer (:mod:`shards.stream`), and the tools and ``scd`` command line on top
(:mod:`shards.tools`). Objective-free: the trainer plugs its per-sample transform into the loader.
"""
from shards.format.schema import SCHEMA_VERSION_STR, AtomGraph, SchemaError, make_key

__all__ = ["AtomGraph", "SchemaError", "make_key", "SCHEMA_VERSION_STR"]
