"""distillation family (methods land here, one file each)."""
