"""What the pipeline and the CLI report: metrics (scoring.py), figures (maps.py, charts.py,
embeddings.py; the evaluate stage's set: figures.py) and benchmark evaluations (benchmark.py)."""
