"""UTKFace data: the TFDS builder, the tf.data pipeline and synthetic faces."""
