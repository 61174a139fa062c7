"""Preference-data generation on Ray Data (see docs/data.md).

``generate.py`` composes the pipeline; ``stages.py`` holds the model stages (actor pools), ``pairing.py``
the light ones, ``schema.py`` the versioned Parquet schema, ``prompts.py`` and ``perturb.py`` the sources
and c⁻. Nothing heavy is imported here: Ray task workers import this package.
"""
