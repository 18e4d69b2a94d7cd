"""The ADM evaluator's input path run by TensorFlow itself: ``python tf_input_path.py IN.npz OUT.npz``.

For every uint8 ``(N, H, W, 3)`` array of IN.npz, OUT.npz gets under the same key what the 2015 Inception graph
computes from those images fed at ``ExpandDims:0`` (as ADM's evaluator feeds them, float 0–255) before its first
convolution: the graph's ``ResizeBilinear`` to 299 × 299 (TF1 semantics: ``align_corners=False``, no half-pixel
centres), then its ``Sub`` 128 and ``Mul`` 0.0078125, in float32 — float32 ``(N, 299, 299, 3)``. For every integer
``n`` in IN.npz's ``matrix_sizes``, ``matrix_<n>`` is the (299, n) matrix of that resize along one axis (TF's
resize of the n one-hot columns of an identity).

Run in a subprocess with TensorFlow's own folder on ``PYTHONPATH`` (requirements-tf.txt says why it stays out of
the test process).
"""

import sys

import numpy as np
import tensorflow as tf

tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)


def adm_input_path(images: np.ndarray) -> np.ndarray:
    x = tf.constant(images.astype(np.float32))
    x = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False, half_pixel_centers=False)
    return ((x - tf.constant(128.0)) * tf.constant(0.0078125)).numpy()


def resize_matrix(n: int) -> np.ndarray:
    eye = tf.constant(np.eye(n, dtype=np.float32)[None, :, None, :])  # (1, H=n, W=1, C=n): column j is one-hot j
    out = tf.compat.v1.image.resize_bilinear(eye, [299, 1], align_corners=False, half_pixel_centers=False)
    return out.numpy()[0, :, 0, :]


if __name__ == "__main__":
    src, dst = sys.argv[1:]
    with np.load(src) as f:
        out = {key: adm_input_path(f[key]) for key in f.files if key != "matrix_sizes"}
        out.update({f"matrix_{n}": resize_matrix(int(n)) for n in f["matrix_sizes"]})
    np.savez(dst, tf_version=np.array(tf.__version__), **out)
