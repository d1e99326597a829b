"""The pipeline's stages as plain functions: they wire geodata (tables) to hierloc (torch).

No Prefect and no MLflow here: flows/tasks.py wraps each stage in a task and a tracked
run; the CLI can call them directly. Stages pass paths, not frames. One module per stage
(ingest, hierarchy, features, train, export, evaluate); files.py reads and writes what
they share, data_dir.py says what a data folder holds, faults.py names the errors no retry
cures. Every file a stage writes lives under its own folder of the work directory:

    ingest/      manifest/{split}.parquet/part-*.parquet (one part per incremental run), image_index/{split}.parquet,
                 quarantine.parquet, ingest_report.json, ingest_state.json,
                 features/<name>/shard-<split>-*.npz (precomputed WebDataset features)
    hierarchy/   entities.parquet, assignments_{split}.parquet, hierarchy_report.json,
                 quarantine.parquet (label_mismatch: coordinates contradict the country label)
    features/cache/<backbone>-<weights key>/shard-*.npz   one incremental cache per backbone, by image id
    features/<backbone>-<digest>/{split}/view.json        what train/evaluate read
    train/<digest>/  checkpoint.pt, model.pt
    export/<digest>/ the model bundle (hierloc.infer.predictor); export/latest.json points at the newest
    evaluate/    predictions.parquet, metrics.json, figures/*.png (the retrieval baseline writes here too)
"""
