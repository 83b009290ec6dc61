"""Weights that ship with the package (see each file's maker: efficientad_teacher_w*.pt come from
``python -m anomaly_zoo.models.distillation.efficientad distil-teacher``)."""
