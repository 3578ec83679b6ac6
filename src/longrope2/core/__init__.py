"""Infrastructure every stage shares: config and its checks, errors, stage outputs and inputs on disk, tracking, resume, threads and processes, launch."""
