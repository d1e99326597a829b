"""MLflow for the pipeline: runs (runs.py), what each stage read and wrote (lineage.py), the
model registry and its gate (registry.py); and Prefect's cached results, JSON only (result_cache.py)."""
