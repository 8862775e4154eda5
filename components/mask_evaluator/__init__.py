"""Mask evaluator component: COCO mask AP with pycocotools."""
