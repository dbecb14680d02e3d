"""kdcache: consistent knowledge distillation from cached teacher outputs.

The teacher runs once on seeded augmented views of every image; its top-k outputs and the view
geometry go into a sharded Zarr v3 cache. The student trainer streams the same images, replays the
exact views and learns from the cache.
"""

from .version import __version__
