"""Ray's ``ray.experimental`` names that Cairn has: ``tqdm_ray``."""
