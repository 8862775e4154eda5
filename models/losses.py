"""SOLOv2 losses: sigmoid focal loss on the category grid, Dice loss on the dynamic masks.

Official semantics (WXinlong/SOLO `solov2_head.py::loss`, see docs/CONTRACT.md for shapes):

- ``category_loss = sum(focal over all cells x classes of all levels and images) / (num_pos + 1)``
- ``mask_loss = dice_weight * mean(1 - dice) over all positive cells of the batch``, where the
  mask of positive cell k is ``sigmoid(kernel_k . mask_features)`` (1x1 dynamic conv, done here
  as a batched matmul) and its target is the GT mask of the instance assigned to that cell.

Everything is computed in float32, whatever the dtype of the model outputs (Dice sums over
H/4 x W/4 pixels overflow float16).

Fixed-size positive buffer. The masks of positive cells are computed for at most
``max_positives`` cells per image, chosen by ``top_k`` over the positive indicator, so shapes are
static (``[B, max_positives, H/4, W/4]``). When an image has more positive cells than that, the
positives kept are the first ``max_positives`` in flat cell order (level 0 first, row-major inside
a level, see the contract); the others are left out of the mask loss only: they still count as
positives in the category loss and its ``num_pos + 1`` normaliser, and the Dice mean is taken
over the kept positives. ``num_truncated_positives`` reports how many were left out.

By default (``trim_buffer=True``) the buffer is cut to the most positives any image of the batch
has (still at most ``max_positives``), so the buffer's second dimension is dynamic. The slots cut
are padding that contributes nothing, so the loss and its gradients are unchanged, but their
masks are not computed: on `demo_cpu` (about 40 positives an image, 1024 slots) that work
was about 22% of a training step. ``trim_buffer=False`` keeps the static
``[B, max_positives, H/4, W/4]`` shapes that XLA and TPUs need.

Multi-replica training. Both losses are a sum divided by a batch-wide count, so a replica that
sees part of the global batch must divide its local sums by the GLOBAL counts; the per-replica
losses then add up (over replicas) to the single-device loss of the global batch, which is what a
SUM all-reduce of gradients expects. In a replica context (inside ``strategy.run`` or a Keras
``train_step`` / ``compute_loss``)::

    n_pos, n_mask = global_positive_counts(targets["cell_class"], max_positives)
    parts = solov2_loss(outputs, targets, num_classes=C, max_positives=max_positives,
                        global_num_positives=n_pos, global_num_mask_positives=n_mask)
    loss = parts["total_loss"]  # this replica's share; do NOT average over replicas again

Return ``total_loss`` as is from an overridden ``compute_loss``: Keras 3 then sums the gradients
over replicas. Do not wrap it in a ``keras.losses.Loss``, which would scale it again by
``1 / num_replicas``. The global loss value for logging is the SUM over replicas of
``total_loss`` (Keras' loss tracker multiplies by ``num_replicas`` and averages, which gives
the same number).
"""

from __future__ import annotations

import tensorflow as tf

# Positive cells per image with a mask in the loss. An object gets at most 3x3 cells per level
# and usually 2 levels (the scale ranges overlap x2), i.e. <= 18 cells; crowded images are made
# of small objects that get 1-4 cells per level, and later objects overwrite shared cells. 1024
# leaves room for ~57 large objects or hundreds of small ones, and costs
# 1024 x H/4 x W/4 floats per image per mask tensor (275 MB at 800x1344).
DEFAULT_MAX_POSITIVES = 1024

DICE_EPS = 0.001


def sigmoid_focal_loss(
    logits: tf.Tensor, targets_one_hot: tf.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> tf.Tensor:
    """Elementwise sigmoid focal loss (Lin et al.), as in mmdet's ``sigmoid_focal_loss``.

    Args:
      logits: ``[...]`` pre-sigmoid scores, any float dtype.
      targets_one_hot: ``[...]`` same shape, 1 for the target class, 0 elsewhere.

    Returns:
      ``[...]`` float32: ``alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)``.
    """
    logits = tf.cast(logits, tf.float32)
    targets = tf.cast(targets_one_hot, tf.float32)
    probs = tf.sigmoid(logits)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    one_minus_pt = probs * (1.0 - targets) + (1.0 - probs) * targets
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return alpha_t * tf.pow(one_minus_pt, gamma) * bce


def dice_loss(
    masks: tf.Tensor,
    targets: tf.Tensor,
    valid: tf.Tensor | None = None,
    *,
    from_logits: bool = False,
) -> tf.Tensor:
    """Per-instance Dice loss ``1 - 2 sum(pq) / (sum(p^2) + 0.001 + sum(q^2) + 0.001)``.

    Args:
      masks: ``[..., N, h, w]`` predicted probabilities (or logits with ``from_logits=True``).
      targets: ``[..., N, h, w]`` binary targets (any numeric dtype).
      valid: optional ``[..., N]`` bool; invalid instances get a loss of exactly 0.
      from_logits: apply a sigmoid to ``masks`` first.

    Returns:
      ``[..., N]`` float32 loss per instance.
    """
    p = tf.cast(masks, tf.float32)
    if from_logits:
        p = tf.sigmoid(p)
    q = tf.cast(targets, tf.float32)
    a = tf.reduce_sum(p * q, axis=[-2, -1])
    b = tf.reduce_sum(p * p, axis=[-2, -1]) + DICE_EPS
    c = tf.reduce_sum(q * q, axis=[-2, -1]) + DICE_EPS
    loss = 1.0 - 2.0 * a / (b + c)
    if valid is not None:
        loss = tf.where(valid, loss, tf.zeros_like(loss))
    return loss


def positive_counts(
    cell_class: tf.Tensor, max_positives: int = DEFAULT_MAX_POSITIVES
) -> tuple[tf.Tensor, tf.Tensor]:
    """Local positive counts of a batch of targets.

    Args:
      cell_class: ``[B, num_cells]`` int, ``-1`` for background.
      max_positives: size of the per-image positive buffer of :func:`solov2_loss`.

    Returns:
      ``(num_positives, num_mask_positives)`` float32 scalars: positive cells in the batch, and
      positive cells whose mask enters the Dice loss (``sum_b min(pos_b, max_positives)``).
    """
    per_image = tf.reduce_sum(tf.cast(cell_class >= 0, tf.int32), axis=1)
    kept = tf.minimum(per_image, min(max_positives, _static_dim(cell_class, 1)))
    return (
        tf.cast(tf.reduce_sum(per_image), tf.float32),
        tf.cast(tf.reduce_sum(kept), tf.float32),
    )


def global_positive_counts(
    cell_class: tf.Tensor, max_positives: int = DEFAULT_MAX_POSITIVES
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`positive_counts` summed over all replicas (call in a replica context).

    Under the default strategy (one device) this equals :func:`positive_counts`.
    """
    counts = tf.stack(positive_counts(cell_class, max_positives))
    ctx = tf.distribute.get_replica_context()
    if ctx is not None:
        counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, counts)
    return counts[0], counts[1]


def solov2_loss(
    outputs: dict[str, tf.Tensor],
    targets: dict[str, tf.Tensor],
    *,
    num_classes: int,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    dice_weight: float = 3.0,
    max_positives: int = DEFAULT_MAX_POSITIVES,
    global_num_positives: tf.Tensor | float | None = None,
    global_num_mask_positives: tf.Tensor | float | None = None,
    trim_buffer: bool = True,
) -> dict[str, tf.Tensor]:
    """SOLOv2 training loss on a batch.

    Args:
      outputs: model outputs, ``category_logits [B, L, C]``, ``kernels [B, L, E]``,
        ``mask_features [B, h, w, E]`` (L = number of cells, 3872 for the default grids).
      targets: ``cell_class [B, L]`` int (-1 = background), ``cell_instance [B, L]`` int
        (index into ``instance_masks``), ``instance_masks [B, N, h, w]`` in {0, 1}.
      num_classes: C.
      max_positives: per-image positive buffer (see the module docstring for truncation).
      global_num_positives, global_num_mask_positives: batch-wide counts used as normalisers
        instead of the local ones (multi-replica training, see the module docstring).
      trim_buffer: cut the positive buffer to the batch's largest positive count (dynamic
        shape); False keeps it static at ``max_positives`` (XLA / TPU).

    Returns:
      dict of float32 scalars: ``category_loss``, ``mask_loss`` (already x ``dice_weight``),
      ``total_loss``, the raw sums ``category_loss_sum`` and ``dice_loss_sum`` (unweighted), the
      local counts ``num_positives`` and ``num_mask_positives``, and ``num_truncated_positives``
      (int32, positives left out of the mask loss).
    """
    category_logits = tf.cast(outputs["category_logits"], tf.float32)
    kernels = tf.cast(outputs["kernels"], tf.float32)
    mask_features = tf.cast(outputs["mask_features"], tf.float32)
    cell_class = tf.cast(targets["cell_class"], tf.int32)
    cell_instance = tf.cast(targets["cell_instance"], tf.int32)
    instance_masks = targets["instance_masks"]

    num_cells = _static_dim(cell_class, 1)
    positive = cell_class >= 0

    # Category branch: one-hot of -1 is all zeros, i.e. background.
    one_hot = tf.one_hot(cell_class, num_classes, dtype=tf.float32)
    focal = sigmoid_focal_loss(category_logits, one_hot, focal_alpha, focal_gamma)
    category_loss_sum = tf.reduce_sum(focal)

    # Positive buffer: keys num_cells - index on positives, 0 elsewhere, so top_k returns the
    # positives in ascending cell order and then background cells (flagged invalid).
    k = min(max_positives, num_cells)
    if trim_buffer:  # At least one slot, so that a batch without positives keeps its shapes.
        most_positives = tf.reduce_max(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1))
        k = tf.clip_by_value(most_positives, 1, k)
    cell_ids = tf.range(num_cells, dtype=tf.int32)
    keys = tf.where(positive, num_cells - cell_ids[tf.newaxis], 0)
    _, pos_cells = tf.math.top_k(keys, k=k, sorted=True)  # [B, k]
    pos_valid = tf.gather(positive, pos_cells, batch_dims=1)

    # Dynamic 1x1 conv of the kept kernels on the mask features: [B, k, E] x [B, E, h*w].
    shape = tf.shape(mask_features)
    batch, height, width = shape[0], shape[1], shape[2]
    features_flat = tf.reshape(mask_features, [batch, height * width, -1])
    pos_kernels = tf.gather(kernels, pos_cells, batch_dims=1)
    mask_logits = tf.matmul(pos_kernels, features_flat, transpose_b=True)
    mask_logits = tf.reshape(mask_logits, [batch, k, height, width])

    # Targets: an extra all-zero instance at index N gives padded slots (and batches without any
    # instance) something to gather.
    instance_masks = tf.convert_to_tensor(instance_masks)
    masks_shape = tf.shape(instance_masks)
    zero_instance = tf.zeros(
        [masks_shape[0], 1, masks_shape[2], masks_shape[3]], dtype=instance_masks.dtype
    )
    padded_masks = tf.concat([instance_masks, zero_instance], axis=1)
    num_instances = masks_shape[1]
    pos_instance = tf.gather(cell_instance, pos_cells, batch_dims=1)
    pos_instance = tf.where(pos_valid & (pos_instance >= 0), pos_instance, num_instances)
    pos_targets = tf.gather(padded_masks, pos_instance, batch_dims=1)

    dice = dice_loss(mask_logits, pos_targets, pos_valid, from_logits=True)
    dice_loss_sum = tf.reduce_sum(dice)

    num_positives, num_mask_positives = positive_counts(cell_class, max_positives)
    num_truncated = tf.cast(num_positives - num_mask_positives, tf.int32)
    norm_pos = num_positives if global_num_positives is None else global_num_positives
    norm_mask = (
        num_mask_positives if global_num_mask_positives is None else global_num_mask_positives
    )
    norm_pos = tf.cast(norm_pos, tf.float32)
    norm_mask = tf.cast(norm_mask, tf.float32)

    category_loss = category_loss_sum / (norm_pos + 1.0)
    # 0 / max(0, 1) = 0 exactly when there is no positive anywhere.
    mask_loss = dice_weight * dice_loss_sum / tf.maximum(norm_mask, 1.0)
    return {
        "category_loss": category_loss,
        "mask_loss": mask_loss,
        "total_loss": category_loss + mask_loss,
        "category_loss_sum": category_loss_sum,
        "dice_loss_sum": dice_loss_sum,
        "num_positives": num_positives,
        "num_mask_positives": num_mask_positives,
        "num_truncated_positives": num_truncated,
    }


def _static_dim(tensor: tf.Tensor, axis: int) -> int:
    dim = tensor.shape[axis]
    if dim is None:
        raise ValueError(f"axis {axis} must have a static size, got shape {tensor.shape}")
    return int(dim)
