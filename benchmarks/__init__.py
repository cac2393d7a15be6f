"""Benchmarks: vqcompress against its peers on real models, measured in one run (`make bench`)."""
