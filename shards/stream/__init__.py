"""The stream: from dataset indices to batches, deterministic and resumable.

``table`` joins the indices of several datasets into one sample table; ``mixture`` says how much of each
group to draw; ``shuffle`` orders each group's samples pass by pass (strategies chosen by name);
``plan`` assigns stream positions to ranks and packs them into atom-budget batches (metadata only),
``partition`` says which positions each rank takes and deals them again on another world size;
``loader`` fetches and decodes the planned samples (``fetch``, a bounded shard cache), applies a
per-sample transform (the objective's hook) and collates them (``collate``); ``graph`` builds radius
graphs with exact periodic images for transforms that need them.
"""
from __future__ import annotations

from shards.stream.collate import collate
from shards.stream.fetch import SampleFetcher, ShardCache
from shards.stream.graph import EdgeBudgetError, radius_graph, radius_graph_with_offsets
from shards.stream.loader import BatchStream, LoaderConfig, SampleContext, Transform, make_planner, plain_arrays
from shards.stream.mixture import MixtureConfig, group_probabilities, load_mixture
from shards.stream.partition import VirtualStream, redeal, stream_of
from shards.stream.plan import Batch, Planner, RepeatSpec, SampleTable, build_table, keyed_rng, redeal_states

__all__ = [
    "Batch", "BatchStream", "EdgeBudgetError", "LoaderConfig", "MixtureConfig", "Planner", "RepeatSpec",
    "SampleContext", "SampleFetcher", "SampleTable", "ShardCache", "Transform", "build_table", "collate",
    "group_probabilities", "keyed_rng", "load_mixture", "make_planner", "plain_arrays", "radius_graph",
    "radius_graph_with_offsets", "redeal", "redeal_states", "stream_of", "VirtualStream",
]
