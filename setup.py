"""Package definition for the SOLOv2 TFX pipeline.

Dependencies are pinned in requirements.lock (resolved with uv from requirements.in); install
with `make venv` (scripts/bootstrap.sh), which syncs the lock and installs this package
editable without letting pip resolve anything. `install_requires` only names the direct
dependencies so that a wheel of this package documents what it needs.
"""

from setuptools import find_packages, setup

setup(
    name="solov2-tfx",
    version="0.1.0",
    description="SOLOv2 instance segmentation as a TFX production pipeline (Keras 3, Beam, MLMD).",
    python_requires=">=3.10,<3.11",
    packages=find_packages(
        include=["pipeline*", "components*", "models*", "schemas*", "kubeflow*"]
    ),
    package_data={"schemas": ["*.pbtxt"]},
    include_package_data=True,
    install_requires=[
        "tfx[kfp]==1.16.0",
        "tensorflow==2.16.2",
        "apache-beam[gcp]==2.59.0",
        "kfp==2.5.0",
        "kfp-pipeline-spec==0.2.2",
        "numpy<2",
        "protobuf>=3.20.3,<3.21",
        "pycocotools",
        "pillow",
        "matplotlib",
        "psutil",
    ],
    entry_points={"console_scripts": ["solov2=pipeline.cli:main"]},
)
