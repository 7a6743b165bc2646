"""Speed routes only: how the package's products, permutations and normalisations run on each device.

``matmul`` picks the route of a dense product (oneDNN for float32 on x86 CPUs); ``gathers`` applies
permutations as gathers with gather backwards; ``cpu_kernels`` is the optional compiled CPU extension;
``heap`` keeps freed memory for reuse. Every route computes the same values as the plain PyTorch expression
(tests compare each with a float64 reference). Nothing here imports the package above :mod:`widesparse.linalg`.
"""
