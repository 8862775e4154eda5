"""Pipeline knobs: names and defaults shared by the local and Kubeflow runners."""

PIPELINE_NAME = "solov2"
# TF Serving's --model_name; the Pusher's base directory ends in it (`serving/solov2/<version>`).
SERVING_MODEL_NAME = "solov2"
# Model config used when none is named (see models/config.py EXPERIMENTS).
DEFAULT_EXPERIMENT = "demo_cpu"
# The schema that ImportSchemaGen brings into the pipeline.
SCHEMA_PATH_IN_PACKAGE = "schemas/schema.pbtxt"
# Beam runs on the local DirectRunner by default; see README "Beam at scale" for other runners.
DEFAULT_BEAM_ARGS = ("--direct_running_mode=in_memory", "--direct_num_workers=1")
