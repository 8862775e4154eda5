# The one image for Kubeflow Pipelines steps and Beam (Dataflow) workers.
#
#   docker build -t REGISTRY/solov2:TAG . && docker push REGISTRY/solov2:TAG
#
# Dependencies come only from the committed requirements.lock (uv, hashes checked); the project is
# installed on top without resolving anything, as scripts/bootstrap.sh does for .venv.
#
# KFP: the compiled spec sets every step's command (`python -m
# tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor ...`, plus the ExampleGen
# driver as a pre-cache-check hook) and the KFP launcher wraps it, so the ENTRYPOINT below is
# never used there. Dataflow (`--sdk_container_image`): workers start /opt/apache/beam/boot, which
# must be the ENTRYPOINT and must match the locked apache-beam and the Python version.
#
# TF_USE_LEGACY_KERAS is deliberately unset: the model is Keras 3 (`import keras`).

ARG PYTHON_VERSION=3.10
ARG BEAM_VERSION=2.59.0

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam

FROM python:${PYTHON_VERSION}-slim

ARG UV_VERSION=0.13.9
# CUDA=1 adds TensorFlow's own CUDA/cuDNN wheels (`tensorflow[and-cuda]`, exact pins of the locked
# TensorFlow, everything else constrained by the lock) so the Trainer and the evaluator can use
# the GPU; CUDA=0 gives a CPU-only image (~3 GB smaller).
ARG CUDA=1
# RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT: Beam's boot would otherwise create its own venv, without
# the packages of /opt/venv. LD_LIBRARY_PATH: the pip CUDA libraries (TF 2.16 does not always find
# them by itself, tensorflow/tensorflow#63362) and the driver that GKE mounts in /usr/local/nvidia.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    VIRTUAL_ENV=/opt/venv \
    RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1 \
    NVIDIA_PIP=/opt/venv/lib/python3.10/site-packages/nvidia
ENV PATH=/opt/venv/bin:$NVIDIA_PIP/cuda_nvcc/bin:$PATH \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:$NVIDIA_PIP/cudnn/lib:$NVIDIA_PIP/cublas/lib:$NVIDIA_PIP/cuda_cupti/lib:$NVIDIA_PIP/cuda_nvrtc/lib:$NVIDIA_PIP/cuda_runtime/lib:$NVIDIA_PIP/cufft/lib:$NVIDIA_PIP/curand/lib:$NVIDIA_PIP/cusolver/lib:$NVIDIA_PIP/cusparse/lib:$NVIDIA_PIP/nccl/lib:$NVIDIA_PIP/nvjitlink/lib

# The locked stack. A compiler only for the few sdists in the lock; removed in the same layer.
COPY requirements.lock /tmp/requirements.lock
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && python -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
    && python -m venv "$VIRTUAL_ENV" \
    && /opt/uv/bin/uv pip sync --no-cache --python "$VIRTUAL_ENV/bin/python" /tmp/requirements.lock \
    && if [ "$CUDA" = "1" ]; then \
         tf_version=$(sed -n 's/^tensorflow==\([0-9.]*\).*/\1/p' /tmp/requirements.lock) \
         && /opt/uv/bin/uv pip install --no-cache --python "$VIRTUAL_ENV/bin/python" \
              --constraint /tmp/requirements.lock "tensorflow[and-cuda]==${tf_version}"; \
       fi \
    && apt-get purge -y --auto-remove build-essential \
    && rm -rf /var/lib/apt/lists/* /tmp/requirements.lock

# The project (pipeline, components, models, schemas, kubeflow): non-editable, no dependencies.
# The schema check guards kubeflow/runner.py IMAGE_SCHEMA_PATH, which ImportSchemaGen reads.
COPY . /tmp/src
RUN /opt/uv/bin/uv pip install --no-cache --python "$VIRTUAL_ENV/bin/python" \
        --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src /opt/uv \
    && test -f /opt/venv/lib/python3.10/site-packages/schemas/schema.pbtxt \
    && python -c "import components.coco_example_gen.executor, components.solo_targets.component, pycocotools.mask, tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"

COPY --from=beam /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]
