"""one_class family (methods land here, one file each)."""
