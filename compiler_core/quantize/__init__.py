"""Post-training quantization: calibration and the scheme-agnostic quantize flow."""
