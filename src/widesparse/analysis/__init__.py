"""Analysis of models and runs: spectra of the mixing weights, the implicit-L1 theory, memory and FLOP
profiles, CKA plots."""
