"""Evaluation sets: the ground truth of geolocation benchmarks and their photos.

- ``geodata.eval_sets.benchmark_csv``: Im2GPS3k / YFCC4k / generic CSVs (columns found,
  bad rows quarantined with their line);
- ``geodata.eval_sets.latlon_order``: which column is the latitude, whatever the header says;
- ``geodata.eval_sets.truth``: any supported benchmark (OSV-5M's ``test.csv`` too) as a Truth
  with OSV-5M labels on every row;
- ``geodata.eval_sets.photos``: a benchmark's photos found under a folder, decoded in batches.
"""
