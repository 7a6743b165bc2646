"""Speed routes only: how the package's products, permutations and normalisations run on each device.

``route`` holds the one routing function of the Mixer family's forward (:func:`~widesparse.ops.route.choose_route`)
and the :func:`~widesparse.ops.route.fast_routes` switch; ``mixer`` the executors it picks between; ``tables``
the permutations' gather tables, derived from the buffers and cached; ``matmul`` the route of a dense product
(oneDNN for float32 on x86 CPUs); ``gathers`` permutations as gathers with gather backwards; ``cpu_kernels`` the
optional compiled CPU extension; ``heap`` keeps freed memory for reuse. Every route computes the same values as
the plain PyTorch expression (tests compare each with a float64 reference). Nothing here imports the package
above :mod:`widesparse.linalg`.
"""

from widesparse.ops.route import fast_routes

__all__ = ["fast_routes"]
