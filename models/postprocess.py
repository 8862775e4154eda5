"""SOLOv2 inference: point NMS, dynamic masks, Matrix NMS, fixed-size detections.

Pure TensorFlow functions with static output shapes (batch-major, padded), usable inside
``tf.function`` / XLA and in the serving signature. The algorithm follows the official
``SOLOv2Head.get_seg_single`` + ``matrix_nms`` (WXinlong/SOLO); see :func:`detect` for the one
place where a fixed bound replaces a data-dependent size.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

# Cells per image whose masks are computed in detect(). Exact (same result as the official
# code) whenever at most this many cells have some class above score_threshold after point NMS;
# a trained COCO model typically has a few hundred. Cost per image: max_candidate_cells dynamic
# masks of H/4 x W/4 (computed in chunks), plus bool masks of that size kept for Matrix NMS.
DEFAULT_MAX_CANDIDATE_CELLS = 1000
DEFAULT_MASK_CHUNK_SIZE = 200


def point_nms(category_probs: tf.Tensor) -> tf.Tensor:
    """Keep local maxima of a category grid (official ``points_nms``, kernel 2).

    ``max_pool2d(2x2, stride 1, pad 1)`` cropped to ``[:-1, :-1]`` compares cell (i, j) with
    (i-1, j), (i, j-1), (i-1, j-1); a cell is kept when it equals that max (ties all kept).

    Args:
      category_probs: ``[B, S, S, C]`` probabilities of one level.

    Returns:
      ``[B, S, S, C]``: the input where it is a local maximum, 0 elsewhere.
    """
    padded = tf.pad(
        category_probs,
        [[0, 0], [1, 0], [1, 0], [0, 0]],
        constant_values=float("-inf"),
    )
    hmax = tf.nn.max_pool2d(padded, ksize=2, strides=1, padding="VALID")
    return tf.where(tf.equal(hmax, category_probs), category_probs, tf.zeros_like(category_probs))


def matrix_nms(
    masks_binary: tf.Tensor,
    labels: tf.Tensor,
    scores: tf.Tensor,
    mask_areas: tf.Tensor | None = None,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    valid: tf.Tensor | None = None,
) -> tf.Tensor:
    """Class-aware Matrix NMS (SOLOv2 paper App. A, official ``matrix_nms``).

    Candidates must be sorted by descending score (invalid ones may be anywhere). With
    ``iou[i, j]`` the mask IoU for ``i < j`` of the same class (0 otherwise) and
    ``comp[i] = max_k iou[k, i]``, the decay of candidate j is
    ``min_i exp(-sigma * iou[i, j]^2) / exp(-sigma * comp[i]^2)`` (gaussian) or
    ``min_i (1 - iou[i, j]) / (1 - comp[i])`` (linear). Invalid candidates take part in no
    pair, so they never decay a valid one.

    Args:
      masks_binary: ``[N, h, w]`` or ``[B, N, h, w]`` in {0, 1} (bool or numeric).
      labels: ``[N]`` / ``[B, N]`` int class ids.
      scores: ``[N]`` / ``[B, N]`` float, descending along N.
      mask_areas: ``[N]`` / ``[B, N]`` pixel counts; computed from the masks when None.
      kernel: ``"gaussian"`` or ``"linear"``.
      sigma: gaussian sigma (official 2.0; the paper's exp(-(iou^2 - comp^2)/0.5) is the same).
      valid: ``[N]`` / ``[B, N]`` bool; defaults to ``labels >= 0``.

    Returns:
      ``[N]`` / ``[B, N]`` float32 decayed scores, 0 for invalid candidates.
    """
    masks = tf.cast(masks_binary, tf.float32)
    if valid is None:
        valid = labels >= 0
    flat = tf.reshape(masks, tf.concat([tf.shape(masks)[:-2], [-1]], axis=0))  # [..., N, hw]
    if mask_areas is None:
        mask_areas = tf.reduce_sum(flat, axis=-1)
    areas = tf.cast(mask_areas, tf.float32)
    inter = tf.matmul(flat, flat, transpose_b=True)  # [..., N, N]
    union = areas[..., :, tf.newaxis] + areas[..., tf.newaxis, :] - inter
    iou = tf.math.divide_no_nan(inter, union)
    return matrix_nms_from_iou(iou, labels, scores, valid, kernel=kernel, sigma=sigma)


def matrix_nms_from_iou(
    iou: tf.Tensor,
    labels: tf.Tensor,
    scores: tf.Tensor,
    valid: tf.Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> tf.Tensor:
    """The decay step of :func:`matrix_nms`, given the ``[..., N, N]`` IoU matrix.

    Only the strictly upper triangle (``i < j``) of ``iou`` is read. ``labels``, ``scores``,
    ``valid``: ``[..., N]``. Returns ``[..., N]`` float32 decayed scores, 0 where invalid.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    iou = tf.cast(iou, tf.float32)
    scores = tf.cast(scores, tf.float32)
    n = tf.shape(iou)[-1]
    order = tf.range(n)
    strictly_upper = order[:, tf.newaxis] < order[tf.newaxis, :]  # i < j
    same_class = tf.equal(labels[..., :, tf.newaxis], labels[..., tf.newaxis, :])
    both_valid = valid[..., :, tf.newaxis] & valid[..., tf.newaxis, :]
    decay_iou = tf.where(strictly_upper & same_class & both_valid, iou, tf.zeros_like(iou))
    compensate = tf.reduce_max(decay_iou, axis=-2)[..., :, tf.newaxis]  # comp[i] on row i

    if kernel == "gaussian":
        # min_i exp(-s iou^2) / exp(-s comp^2) == exp(s * min_i (comp^2 - iou^2)).
        decay = tf.exp(sigma * tf.reduce_min(tf.square(compensate) - tf.square(decay_iou), axis=-2))
    else:
        # comp == 1 only for exact duplicates; the official 1/0 is +inf there (no decay from
        # that row), the duplicate itself is decayed to 0 by the earlier copy.
        ratio = tf.where(
            compensate < 1.0,
            (1.0 - decay_iou) / tf.maximum(1.0 - compensate, 1e-12),
            tf.fill(tf.shape(decay_iou), float("inf")),
        )
        decay = tf.reduce_min(ratio, axis=-2)
    return tf.where(valid, scores * decay, tf.zeros_like(scores))


def detect(
    category_logits: tf.Tensor,
    kernels: tf.Tensor,
    mask_features: tf.Tensor,
    *,
    grids: Sequence[int],
    strides: Sequence[int],
    score_threshold: float = 0.1,
    mask_threshold: float = 0.5,
    nms_pre: int = 500,
    update_threshold: float = 0.05,
    max_detections: int = 100,
    nms_kernel: str = "gaussian",
    nms_sigma: float = 2.0,
    max_candidate_cells: int = DEFAULT_MAX_CANDIDATE_CELLS,
    mask_chunk_size: int = DEFAULT_MASK_CHUNK_SIZE,
) -> dict[str, tf.Tensor]:
    """SOLOv2 detections from raw model outputs, fixed size per image.

    Official order: sigmoid -> point NMS per level -> candidates = every (cell, class) with
    score > score_threshold -> mask = sigmoid(kernel . features) -> drop masks with area <= stride
    of their level -> score *= maskness (mean soft mask inside the binary mask) -> top nms_pre ->
    Matrix NMS -> keep >= update_threshold -> top max_detections.

    Fixed-shape formulation: a mask depends on the cell only, so masks are computed for the
    ``max_candidate_cells`` cells with the highest max-over-classes score (cells without a
    candidate are flagged invalid), in chunks of ``mask_chunk_size`` cells; all (cell, class)
    pairs of those cells then go through the official steps with validity masks. The result is
    identical to the official one whenever at most ``max_candidate_cells`` cells have a class
    above ``score_threshold`` (beyond that, the cells with the lowest max score are dropped
    before the mask step), up to the order of exactly tied scores.

    Args:
      category_logits: ``[B, L, C]`` pre-sigmoid, L = sum(S^2) cells, levels concatenated.
      kernels: ``[B, L, E]`` dynamic 1x1 kernels.
      mask_features: ``[B, h, w, E]`` (h, w = H/4, W/4).
      grids: grid size S of each level (``[40, 36, 24, 16, 12]``).
      strides: stride of each level (``[8, 8, 16, 32, 32]``), the minimum mask area + 1.

    Returns:
      ``masks [B, K, h, w]`` float32 soft masks (0 where padded), ``scores [B, K]`` float32
      (0 where padded), ``classes [B, K]`` int32 (-1 where padded), ``num_detections [B]``
      int32; K = max_detections, detections sorted by descending score.
    """
    if len(grids) != len(strides):
        raise ValueError(f"grids {grids} and strides {strides} differ in length")
    num_cells = sum(s * s for s in grids)
    if category_logits.shape[1] is not None and category_logits.shape[1] != num_cells:
        raise ValueError(f"category_logits has {category_logits.shape[1]} cells, grids {num_cells}")
    num_classes = category_logits.shape[-1]
    probs = _point_nms_levels(tf.sigmoid(tf.cast(category_logits, tf.float32)), grids)
    kernels = tf.cast(kernels, tf.float32)
    mask_features = tf.cast(mask_features, tf.float32)
    feat_shape = tf.shape(mask_features)
    batch, height, width = feat_shape[0], feat_shape[1], feat_shape[2]
    features_flat = tf.reshape(mask_features, [batch, height * width, -1])  # [B, hw, E]
    cell_stride = tf.concat(
        [tf.fill([s * s], float(st)) for s, st in zip(grids, strides)], axis=0
    )  # [L]

    # 1. Candidate cells: top max_candidate_cells by their best class score.
    is_candidate = probs > score_threshold  # [B, L, C]
    cell_key = tf.where(
        tf.reduce_any(is_candidate, axis=-1), tf.reduce_max(probs, axis=-1), -1.0
    )  # [B, L]
    num_sel = min(max_candidate_cells, num_cells)
    num_chunks = -(-num_sel // mask_chunk_size)
    padded_sel = num_chunks * mask_chunk_size
    key_sel, cells = tf.math.top_k(cell_key, k=num_sel)  # [B, M]
    cell_valid = tf.pad(key_sel > 0.0, [[0, 0], [0, padded_sel - num_sel]])
    cells = tf.pad(cells, [[0, 0], [0, padded_sel - num_sel]])  # padded with cell 0, invalid

    # 2. Their masks, chunk by chunk: binary mask, area, soft sum inside the binary mask.
    cell_kernels = tf.gather(kernels, cells, batch_dims=1)  # [B, M', E]
    chunked = tf.transpose(
        tf.reshape(cell_kernels, [batch, num_chunks, mask_chunk_size, -1]), [1, 0, 2, 3]
    )

    def mask_stats(chunk_kernels):
        soft = tf.sigmoid(tf.matmul(chunk_kernels, features_flat, transpose_b=True))
        binary = soft > mask_threshold
        binary_f = tf.cast(binary, tf.float32)
        return binary, tf.reduce_sum(binary_f, axis=-1), tf.reduce_sum(soft * binary_f, axis=-1)

    binary, area, soft_sum = tf.map_fn(
        mask_stats,
        chunked,
        fn_output_signature=(tf.bool, tf.float32, tf.float32),
    )  # [n_chunks, B, chunk, hw], [n_chunks, B, chunk] x 2
    binary = tf.reshape(tf.transpose(binary, [1, 0, 2, 3]), [batch, padded_sel, height * width])
    area = tf.reshape(tf.transpose(area, [1, 0, 2]), [batch, padded_sel])
    soft_sum = tf.reshape(tf.transpose(soft_sum, [1, 0, 2]), [batch, padded_sel])

    # 3. Area filter and maskness, then every (cell, class) pair of the kept cells.
    cell_ok = cell_valid & (area > tf.gather(cell_stride, cells))
    maskness = tf.math.divide_no_nan(soft_sum, area)
    pair_probs = tf.gather(probs, cells, batch_dims=1)  # [B, M', C]
    pair_valid = (pair_probs > score_threshold) & cell_ok[..., tf.newaxis]
    pair_scores = tf.where(pair_valid, pair_probs * maskness[..., tf.newaxis], -1.0)
    pair_scores = tf.reshape(pair_scores, [batch, padded_sel * num_classes])

    # 4. Top nms_pre, then Matrix NMS on their binary masks.
    num_pre = min(nms_pre, padded_sel * num_classes)
    pre_scores, pre_pairs = tf.math.top_k(pair_scores, k=num_pre)
    pre_valid = pre_scores > 0.0
    pre_slot = pre_pairs // num_classes  # index into the selected cells
    pre_labels = tf.where(pre_valid, pre_pairs % num_classes, -1)
    pre_scores = tf.where(pre_valid, pre_scores, 0.0)
    decayed = matrix_nms(
        tf.gather(binary, pre_slot, batch_dims=1)[..., tf.newaxis],  # [B, P, hw, 1]
        pre_labels,
        pre_scores,
        tf.gather(area, pre_slot, batch_dims=1),
        kernel=nms_kernel,
        sigma=nms_sigma,
        valid=pre_valid,
    )

    # 5. Keep >= update_threshold, top max_detections, soft masks of the survivors.
    keep = pre_valid & (decayed >= update_threshold)
    num_out = min(max_detections, num_pre)
    out_scores, out_idx = tf.math.top_k(tf.where(keep, decayed, -1.0), k=num_out)
    out_valid = tf.gather(keep, out_idx, batch_dims=1)
    out_scores = tf.where(out_valid, out_scores, 0.0)
    out_classes = tf.where(out_valid, tf.gather(pre_labels, out_idx, batch_dims=1), -1)
    out_cells = tf.gather(cells, tf.gather(pre_slot, out_idx, batch_dims=1), batch_dims=1)
    out_kernels = tf.gather(kernels, out_cells, batch_dims=1)
    out_masks = tf.sigmoid(tf.matmul(out_kernels, features_flat, transpose_b=True))
    out_masks = tf.where(out_valid[..., tf.newaxis], out_masks, 0.0)
    out_masks = tf.reshape(out_masks, [batch, num_out, height, width])

    pad = max_detections - num_out
    if pad:
        out_masks = tf.pad(out_masks, [[0, 0], [0, pad], [0, 0], [0, 0]])
        out_scores = tf.pad(out_scores, [[0, 0], [0, pad]])
        out_classes = tf.pad(out_classes, [[0, 0], [0, pad]], constant_values=-1)
    return {
        "masks": out_masks,
        "scores": out_scores,
        "classes": tf.cast(out_classes, tf.int32),
        "num_detections": tf.reduce_sum(tf.cast(out_valid, tf.int32), axis=1),
    }


def _point_nms_levels(probs: tf.Tensor, grids: Sequence[int]) -> tf.Tensor:
    """Point NMS on each level of ``[B, L, C]`` probabilities (levels concatenated)."""
    num_classes = probs.shape[-1]
    levels = tf.split(probs, [s * s for s in grids], axis=1)
    return tf.concat(
        [
            tf.reshape(point_nms(tf.reshape(lv, [-1, s, s, num_classes])), [-1, s * s, num_classes])
            for lv, s in zip(levels, grids)
        ],
        axis=1,
    )


def quantize_masks(soft_masks: tf.Tensor) -> tf.Tensor:
    """Soft masks in [0, 1] -> uint8 round(255 * p), the compact serving form."""
    return tf.cast(tf.round(tf.clip_by_value(soft_masks, 0.0, 1.0) * 255.0), tf.uint8)


def paste_masks(masks: tf.Tensor, image_info: tf.Tensor, mask_threshold: float = 0.5) -> tf.Tensor:
    """One image's serving masks -> binary masks on the original image (official mapping).

    Args:
      masks: `[K, P/4, P/4]` uint8 quantised soft masks (or float probabilities in [0, 1]).
      image_info: `[4]` int: original height, original width, resized height, resized width.
    Returns:
      `[K, H, W]` bool: bilinear x4 to the padded input, crop to the resized image, bilinear
      resize to the original size, then `> mask_threshold` (official `get_seg_single`).
    """
    soft = tf.cast(masks, tf.float32)
    if masks.dtype == tf.uint8:
        # Bilinear resizing is linear, so compare against the threshold in the quantised domain
        # instead of dividing by 255 first: graph optimisation rewrites x / 255 as x * (1/255),
        # which flipped a few pixels at the threshold between eager and tf.function callers.
        mask_threshold = mask_threshold * 255.0
    quarter = tf.shape(soft)[1:3]
    up = tf.image.resize(soft[..., tf.newaxis], quarter * 4, method="bilinear")
    cropped = up[:, : image_info[2], : image_info[3], :]
    full = tf.image.resize(cropped, tf.stack([image_info[0], image_info[1]]), method="bilinear")
    return full[..., 0] > mask_threshold
