"""The tf.Example contract: every feature key the pipeline reads or writes.

This module is the only place that spells a feature key. CocoExampleGen writes these keys,
SoloTargetGen reads and extends them, the trainer's decoder parses them, the exporter's
`serving_default` signature parses them, and the evaluator rebuilds COCO ground truth from
them. `schemas/schema.pbtxt` declares the same features for TFDV validation.

Conventions:
  * One tf.Example per image.
  * Per-object features are parallel lists of equal length (one entry per annotation that
    survived ingestion, in the order of the annotation JSON).
  * Boxes are absolute pixel coordinates of the original image, `[xmin, ymin, xmax, ymax]`
    split over four float lists (COCO's `[x, y, w, h]` converted).
  * Masks are COCO compressed RLE (`pycocotools.mask.encode` output `counts` bytes) at the
    original image size; crowd regions keep their RLE exactly as in the JSON.
  * `area` is the value stored in the annotation JSON, not recomputed: pycocotools uses it
    for the small/medium/large split.
"""

# Image-level features.
IMAGE_ENCODED = "image/encoded"  # bytes: JPEG (re-encoded RGB when the source was not RGB JPEG).
IMAGE_FORMAT = "image/format"  # bytes: b"jpeg" or b"png".
IMAGE_HEIGHT = "image/height"  # int64: original height in pixels.
IMAGE_WIDTH = "image/width"  # int64: original width in pixels.
IMAGE_ID = "image/id"  # int64: COCO image id (may exceed 2**31).
IMAGE_FILENAME = "image/filename"  # bytes: COCO `file_name`, relative to the image root.

# Per-object features (parallel lists).
OBJECT_CLASS = "image/object/class/label"  # int64: contiguous class index in [0, num_classes).
OBJECT_CATEGORY_ID = "image/object/class/category_id"  # int64: original COCO category id.
OBJECT_XMIN = "image/object/bbox/xmin"  # float: pixels.
OBJECT_YMIN = "image/object/bbox/ymin"
OBJECT_XMAX = "image/object/bbox/xmax"
OBJECT_YMAX = "image/object/bbox/ymax"
OBJECT_IS_CROWD = "image/object/is_crowd"  # int64: 0 or 1.
OBJECT_AREA = "image/object/area"  # float: `area` as stored in the annotation JSON.
OBJECT_ANNOTATION_ID = "image/object/annotation_id"  # int64: COCO annotation id.
OBJECT_MASK_RLE = "image/object/mask/rle"  # bytes: compressed COCO RLE counts.

OBJECT_BOX_KEYS = (OBJECT_XMIN, OBJECT_YMIN, OBJECT_XMAX, OBJECT_YMAX)

IMAGE_INT_KEYS = (IMAGE_HEIGHT, IMAGE_WIDTH, IMAGE_ID)
IMAGE_BYTES_KEYS = (IMAGE_ENCODED, IMAGE_FORMAT, IMAGE_FILENAME)
OBJECT_INT_KEYS = (OBJECT_CLASS, OBJECT_CATEGORY_ID, OBJECT_IS_CROWD, OBJECT_ANNOTATION_ID)
OBJECT_FLOAT_KEYS = (*OBJECT_BOX_KEYS, OBJECT_AREA)
OBJECT_BYTES_KEYS = (OBJECT_MASK_RLE,)

# Name of the JSON file, written beside the Split-* folders of every Examples artifact, that maps
# contiguous class index <-> COCO category id <-> name. It travels with the data so the evaluator
# can write true COCO ids back, and the exporter can embed class names.
CATEGORY_MAP_FILENAME = "category_map.json"
# Name of the ingestion report written in the ExampleGen's Examples artifact.
INGESTION_REPORT_FILENAME = "ingestion_report.json"

# SOLO targets, added by SoloTargetGen to each example (all original features are kept).
# Each image carries K target variants (one per training short side x flip); the trainer draws
# one per image per step, so augmentation is not frozen and training does no assignment work.
# List index k of every key below is variant k.
SOLO_VARIANT_SHORT_SIDE = "solo/variant/short_side"  # int64 [K]: resize target (shorter side).
SOLO_VARIANT_FLIP = "solo/variant/flip"  # int64 [K]: 1 = mirrored horizontally.
SOLO_VARIANT_RESIZED_HEIGHT = "solo/variant/resized_height"  # int64 [K]: before padding.
SOLO_VARIANT_RESIZED_WIDTH = "solo/variant/resized_width"  # int64 [K].
SOLO_CELL_CLASS = "solo/cell_class"  # bytes [K]: serialized int32 tensor [num_cells], -1 = bg.
SOLO_CELL_INSTANCE = "solo/cell_instance"  # bytes [K]: serialized int32 tensor [num_cells].
# bytes [K]: serialized uint8 [N, ceil(h/4), ceil(w/32)]: the [N, P/4, P/4] masks cropped to the
# variant's resized h x w and bit-packed (docs/CONTRACT.md; `models.targets.unpack_masks`).
SOLO_INSTANCE_MASKS = "solo/instance_masks_packed"
# int64 [2]: the pad (height, width) of the model input the targets were made for: the square
# (P, P), or under `TrainConfig.orientation_pad` the image's orientation rectangle.
SOLO_PADDED_SIZE = "solo/padded_size"
SOLO_TARGETS_REPORT_FILENAME = "solo_targets_report.json"
# Version of the target format above. SoloTargetGen takes it as an explicit parameter, so that
# changing it changes the component's cache key: a pipeline run after a format change makes
# new targets instead of reusing cached ones in the old format. 2: bit-packed, cropped masks.
# 3: `solo/padded_size` is (height, width), per image (orientation pads).
SOLO_TARGET_FORMAT_VERSION = 3
