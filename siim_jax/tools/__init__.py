"""Command-line tools beside the library (as big_vision keeps them): they use the input pipeline, they are not
part of it. bench_input: host input-pipeline throughput; visualize: sampled training pairs drawn for a person to
check the geometry; make_jpegs: photo-like JPEGs in the image-folder layout (for the benchmark and tests)."""
