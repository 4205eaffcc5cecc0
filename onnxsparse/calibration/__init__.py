"""Calibration data readers, the streaming histogram and the Gram (XᵀX) statistics."""
