"""The factor search: the search space, the GA's operators, the needle-driven fitness, the driver."""
