"""Tests mirror the packages; being a package keeps tests/gpu_runtime from shadowing gpu_runtime."""
