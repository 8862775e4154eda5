"""Kubeflow Pipelines (v2) deployment: `kubeflow.runner.compile_pipeline` and the Dockerfile."""
