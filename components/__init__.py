"""Custom TFX components of the SOLOv2 pipeline, one folder each."""


def __getattr__(name: str):
    # Kubeflow (KFP v2) pods import a custom artifact type by its TYPE_NAME, which must read
    # `<namespace>.<Class>`: see components/run_report/component.py. Resolved lazily so that
    # importing a component package (the trainer imports components.solo_targets) never
    # imports TFX.
    if name == "VisualReport":
        from components.run_report.component import VisualReport

        return VisualReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
