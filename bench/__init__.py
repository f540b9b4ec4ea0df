"""archc benchmarks: each script prints a table and writes it under bench/results/."""
