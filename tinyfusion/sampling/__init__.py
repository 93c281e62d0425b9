"""Generation: per-sample-seeded sampling, fast solvers, precision, labelled grids."""
