"""RoPE maths and the methods' factor rules: pure functions of the RoPE facts (no I/O, no stage)."""
