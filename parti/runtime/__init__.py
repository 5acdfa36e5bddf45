"""What every job runs on: hosts, gin at the edge, atomic files, errors and metric
logging. The mesh and its logical axes stay in `parti.partitioning`, the one module
that knows the mesh axes."""
