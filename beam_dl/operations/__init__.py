"""Running models in production: the MLflow registry (`registry_mlflow`),
drift against a training profile (`drift`), Prometheus export of Beam
metrics (`metrics_export`), progress lines (`progress`) and large local jobs
as resumable input shards (`local_shards`)."""
