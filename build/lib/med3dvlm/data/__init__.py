"""Data half of the pipeline: volume IO, preparation, datasets and the DataModule."""
