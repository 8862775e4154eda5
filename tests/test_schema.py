"""schemas/schema.pbtxt and schemas/features.py describe the same features."""

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from pipeline.pipeline import schema_path
from schemas import features


def _load_schema() -> schema_pb2.Schema:
    with open(schema_path()) as f:
        return text_format.Parse(f.read(), schema_pb2.Schema())


def test_schema_declares_exactly_the_feature_keys():
    schema = _load_schema()
    declared = {f.name: f.type for f in schema.feature}
    expected = {}
    for key in features.IMAGE_INT_KEYS + features.OBJECT_INT_KEYS:
        expected[key] = schema_pb2.INT
    for key in features.OBJECT_FLOAT_KEYS:
        expected[key] = schema_pb2.FLOAT
    for key in features.IMAGE_BYTES_KEYS + features.OBJECT_BYTES_KEYS:
        expected[key] = schema_pb2.BYTES
    assert declared == expected


def test_image_level_features_are_single_valued_and_required():
    schema = _load_schema()
    for feature in schema.feature:
        if feature.name.startswith("image/object/"):
            assert not feature.HasField("value_count"), feature.name  # One value per object.
        else:
            assert (feature.value_count.min, feature.value_count.max) == (1, 1), feature.name
            assert feature.presence.min_fraction == 1.0, feature.name
