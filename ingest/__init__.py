"""Ingest: raw files -> shard datasets, with converter plugins run as Ray jobs.

``plugin`` is the converter contract (:class:`Converter`, :class:`Reject`, options); ``registry`` finds
converters through the ``scd.converters`` entry points; ``job`` reads a job file and plans work units;
``unit`` converts one unit into shards; ``run`` runs a job on Ray (embedded, or the cluster in
``RAY_ADDRESS``) and writes accounting, rejects, index and manifest. Python callers run a job with
:func:`run_job`; ``scd ingest run JOB`` is the same job from the command line, and the trainer's
orchestrating commands (which may not import ingest) launch that command through ``scd_train.launch``.
"""
from __future__ import annotations

from ingest.job import JobConfig, SourceSpec, load_job, plan_units
from ingest.plugin import Converter, Reject
from ingest.registry import PluginError, converter_for, discover, get_converter
from ingest.run import JobResult, run_job

__all__ = ["Converter", "JobConfig", "JobResult", "PluginError", "Reject", "SourceSpec", "converter_for", "discover",
           "get_converter", "load_job", "plan_units", "run_job"]
