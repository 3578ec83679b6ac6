"""A toy Llama base model that retrieves a needle inside its short window (CPU, minutes).

Recipe (see docs/toy_regime.md): a 2-layer Llama with a small BPE vocabulary is
trained first on dense copying (induction heads form), then on a mix of RULER-like
needle samples and "span, filler, same span" recall samples, with the answer tokens
weighted up. Retrieval appears as a phase transition whose step varies by seed, and
some seeds learn absolute positions (a fragile base), hence the quality gate and the
seed retry in :func:`longrope2.toy.gate.pretrain_with_gate`.

Entry point for the pipeline stage: :func:`longrope2.toy.gate.pretrain_with_gate`.
"""
