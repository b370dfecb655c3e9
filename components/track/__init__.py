"""MLflow: runs of each stage, the model registry, the servable model and process lifelines."""
