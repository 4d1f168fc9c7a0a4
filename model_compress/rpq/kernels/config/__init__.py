"""What the kernels are told: the runtime options, the measured route table (tile configurations as data), norm specs."""
